"""The Serve application over real HTTP, on the tiny test checkpoint."""

from __future__ import annotations

import concurrent.futures

import pytest
import requests
from ray import serve

from deployments.app import build_app, model_deployment_name
from tests.service_helpers import app_args, close, post
from tests.test_engine import DOCS, QUERY

pytestmark = pytest.mark.slow

SEED_QUERY = "What is machine learning?"
SEED_DOCS = [
    "Machine learning is a subset of AI that learns patterns from data.",
    "The weather today is sunny with a light breeze.",
    "Deep learning uses neural networks with many layers.",
]


@pytest.fixture(scope="module")
def service(ray_cluster, tiny_checkpoint):
    # Batch-invariant, so that the batching test can ask for the very same numbers alone.
    serve.run(build_app(app_args(tiny_checkpoint, model={"batch_invariant": True})), name="main", route_prefix="/")
    yield ray_cluster
    serve.delete("main")


def test_seed_example_ranks_with_scores_equal_to_engine(service, reranker):
    r = post(f"{service}/rerank", {"query": SEED_QUERY, "documents": SEED_DOCS, "model": "tiny"})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = reranker.score(SEED_QUERY, SEED_DOCS)
    order = sorted(range(3), key=lambda i: (-expected[i], i))
    assert [x["index"] for x in body["results"]] == order
    close([x["relevance_score"] for x in body["results"]], [expected[i] for i in order])
    assert all("document" not in x for x in body["results"])
    assert body["model"] == "tiny" and body["id"].startswith("rerank-")
    tokens = reranker.encode(SEED_QUERY, SEED_DOCS).num_tokens()
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_many_documents_across_chunks_match_engine(service, reranker):
    docs = [f"{i}: {DOCS[i % len(DOCS)]} " + "more words " * (i % 7) for i in range(23)]
    r = post(f"{service}/rerank", {"query": QUERY, "documents": docs, "return_documents": True})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert sorted(x["index"] for x in results) == list(range(23))
    expected = reranker.score(QUERY, docs)
    close([x["relevance_score"] for x in results], [expected[x["index"]] for x in results])
    assert [x["document"] for x in results] == [docs[x["index"]] for x in results]
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("field", ["top_k", "top_n"])
def test_top_k_smaller_and_bigger_than_the_list(service, field):
    full = post(f"{service}/rerank", {"query": QUERY, "documents": DOCS}).json()["results"]
    top = post(f"{service}/rerank", {"query": QUERY, "documents": DOCS, field: 2}).json()["results"]
    assert top == full[:2]
    big = post(f"{service}/rerank", {"query": QUERY, "documents": DOCS, field: 1000}).json()["results"]
    assert big == full


def test_instruction_changes_scores_like_the_engine(service, reranker):
    instruction = "Given a code question, retrieve code that answers it"
    r = post(f"{service}/rerank", {"query": QUERY, "documents": DOCS, "instruction": instruction})
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    expected = reranker.score(QUERY, DOCS, instruction=instruction)
    close([got[i] for i in range(len(DOCS))], expected)
    assert expected != reranker.score(QUERY, DOCS)


def test_ties_rank_lower_index_first(service):
    r = post(f"{service}/rerank", {"query": QUERY, "documents": ["same", "different", "same"]})
    order = [x["index"] for x in r.json()["results"]]
    assert order.index(0) < order.index(2)


def test_v1_jina_vllm_shape(service, reranker):
    docs = [DOCS[0], {"text": DOCS[1]}, DOCS[2]]
    r = post(f"{service}/v1/rerank", {"model": "tiny-alias", "query": QUERY, "documents": docs, "top_n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = reranker.score(QUERY, DOCS[:3])
    order = sorted(range(3), key=lambda i: (-expected[i], i))[:2]
    assert [x["index"] for x in body["results"]] == order
    assert [x["document"] for x in body["results"]] == [{"text": DOCS[i]} for i in order]
    assert body["model"] == "tiny"
    assert set(body["usage"]) == {"prompt_tokens", "total_tokens"}
    everything = post(f"{service}/v1/rerank", {"query": QUERY, "documents": DOCS[:3], "top_n": 0,
                                                "return_documents": False}).json()
    assert len(everything["results"]) == 3 and all("document" not in x for x in everything["results"])


def test_v2_cohere_sdk_works_unchanged(service, reranker):
    cohere = pytest.importorskip("cohere")
    client = cohere.ClientV2(api_key="unused", base_url=service)
    response = client.rerank(model="tiny", query=QUERY, documents=DOCS, top_n=3)
    expected = reranker.score(QUERY, DOCS)
    order = sorted(range(len(DOCS)), key=lambda i: (-expected[i], i))[:3]
    assert [x.index for x in response.results] == order
    close([x.relevance_score for x in response.results], [expected[i] for i in order])
    assert response.meta.billed_units.search_units == 1


def test_v2_max_tokens_per_doc_truncates_and_unused_options_warn(service, reranker):
    long_doc = "rivers and mountains " * 50
    body = {"model": "tiny", "query": QUERY, "documents": [long_doc, DOCS[0]], "max_tokens_per_doc": 5,
            "priority": 3}
    r = post(f"{service}/v2/rerank", body)
    assert r.status_code == 200, r.text
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    cut = reranker.encoder.encode(QUERY, [long_doc, DOCS[0]], max_document_tokens=5)
    close([got[0], got[1]], reranker.score_encoded([cut])[0])
    assert got[0] != pytest.approx(reranker.score(QUERY, [long_doc])[0], abs=1e-6)
    assert r.json()["meta"]["warnings"] == ["priority is accepted but has no effect on this server"]


def test_models_and_health(service):
    models = requests.get(f"{service}/v1/models", timeout=10).json()
    assert models["data"] == [{"id": "tiny", "object": "model", "owned_by": "qwen3-rerank-serve",
                               "aliases": ["tiny-alias"], "max_length": 512}]
    health = requests.get(f"{service}/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok", "models": ["tiny"], "scaled_to_zero": []}


def test_openapi_documents_routes_and_errors(service):
    spec = requests.get(f"{service}/openapi.json", timeout=10).json()
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        assert {"200", "401", "404", "413", "422", "503", "504"} <= set(spec["paths"][path]["post"]["responses"])


ASSET_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_assets_the_service_serves(service, page):
    """/docs and /redoc work offline: every script, style and icon comes from the service."""
    import re

    r = requests.get(f"{service}{page}", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", r.text) + re.findall(r"""url: ?["']([^"']+)["']""", r.text)
    urls += re.findall(r"""spec-url=["']([^"']+)["']""", r.text)
    assert urls, r.text
    assert [u for u in urls if re.match(r"^(https?:)?//", u)] == []  # nothing from a CDN
    assert "/openapi.json" in urls
    assets = [u for u in urls if u != "/openapi.json"]
    assert any(u.endswith(".js") for u in assets) and (page == "/redoc" or any(u.endswith(".css") for u in assets))
    for url in assets:
        asset = requests.get(f"{service}{url}", timeout=10)
        assert asset.status_code == 200, url
        assert ASSET_TYPES[url[url.rindex("."):]] in asset.headers["content-type"], (url, asset.headers["content-type"])
        assert len(asset.content) > 500, url


@pytest.mark.parametrize(
    "path,body,status,fragment",
    [
        ("/rerank", {"query": "", "documents": ["a"]}, 422, "query"),
        ("/rerank", {"query": "   ", "documents": ["a"]}, 422, "query must not be blank"),
        ("/rerank", {"query": "q", "documents": []}, 422, "documents"),
        ("/rerank", {"query": "q"}, 422, "documents: Field required"),
        ("/rerank", {"query": "q", "documents": ["a", 3]}, 422, "documents.1"),
        ("/rerank", {"query": "q", "documents": "a"}, 422, "documents"),
        # Errors name the field as the client sent it, top_k or its alias top_n.
        ("/rerank", {"query": "q", "documents": ["a"], "top_k": 0}, 422, "top_k: Input should be greater than"),
        ("/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 422, "top_n: Input should be greater than"),
        # Strict types: a string is not an integer or a boolean, a float is not an integer.
        ("/rerank", {"query": "q", "documents": ["a"], "top_k": "2"}, 422, "top_k: Input should be a valid integer"),
        ("/rerank", {"query": "q", "documents": ["a"], "top_n": "2"}, 422, "top_n: Input should be a valid integer"),
        ("/rerank", {"query": "q", "documents": ["a"], "top_k": 2.0}, 422, "top_k: Input should be a valid integer"),
        ("/rerank", {"query": "q", "documents": ["a"], "return_documents": "yes"}, 422,
         "return_documents: Input should be a valid boolean"),
        ("/rerank", {"query": "q", "documents": ["a"], "return_documents": 1}, 422,
         "return_documents: Input should be a valid boolean"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": "2"}, 422, "top_n: Input should be a valid integer"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "return_documents": "no"}, 422,
         "return_documents: Input should be a valid boolean"),
        ("/v2/rerank", {"model": "tiny", "query": "q", "documents": ["a"], "top_n": "2"}, 422,
         "top_n: Input should be a valid integer"),
        ("/v2/rerank", {"model": "tiny", "query": "q", "documents": ["a"], "max_tokens_per_doc": "5"}, 422,
         "max_tokens_per_doc: Input should be a valid integer"),
        ("/v2/rerank", {"model": "tiny", "query": "q", "documents": ["a"], "priority": "1"}, 422,
         "priority: Input should be a valid integer"),
        ("/rerank", {"query": "q", "documents": ["a"], "top_k": 1, "top_n": 1}, 422, "not both"),
        ("/rerank", {"query": "q", "documents": ["a"], "topk": 1}, 422, "topk: Extra inputs are not permitted"),
        ("/rerank", {"query": "q", "documents": ["a"], "model": "nope"}, 404, "model 'nope' is not served"),
        ("/rerank", {"query": "q", "documents": ["a"], "model": "../../etc"}, 404, "is not served"),
        ("/rerank", {"query": "q", "documents": ["a"] * 51}, 413, "51 documents; the limit is 50"),
        ("/rerank", {"query": "q", "documents": ["a" * 10_000, "b" * 10_000]}, 413, "characters"),
        ("/rerank", {"query": "word " * 600, "documents": ["a"]}, 422, "no room for a document"),
        ("/v1/rerank", {"query": "q", "documents": [{"txt": "a"}]}, 422, "documents"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, 422, "top_n"),
        ("/v2/rerank", {"query": "q", "documents": ["a"]}, 422, "model: Field required"),
        ("/v2/rerank", {"model": "x", "query": "q", "documents": ["a"]}, 404, "model 'x'"),
    ],
)
def test_errors_are_json_with_status_type_and_message(service, path, body, status, fragment):
    r = post(f"{service}{path}", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and fragment in error["message"] and error["type"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_without_a_json_content_type_is_told_to_send_one(service, content_type):
    headers = {"content-type": content_type} if content_type else {}
    data = b'{"query": "q", "documents": ["a"]}'
    r = requests.post(f"{service}/rerank", data=data, headers=headers, timeout=30)
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert (f"content-type {content_type!r}" if content_type else "no content-type header") in message
    assert "send `content-type: application/json`" in message
    for json_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        r = requests.post(f"{service}/rerank", data=data, headers={"content-type": json_type}, timeout=30)
        assert r.status_code == 200, (json_type, r.text)


def test_invalid_json_and_oversized_body(service):
    r = requests.post(f"{service}/rerank", data=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request"
    r = requests.post(f"{service}/rerank", data=b"x" * 300_000, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "300000 bytes" in r.json()["error"]["message"]


def test_concurrent_requests_share_forward_passes_and_keep_their_scores(service, reranker):
    handle = serve.get_deployment_handle(model_deployment_name("tiny"), app_name="main")
    before = handle.stats.remote().result()
    queries = [f"question number {i} about rivers" for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(len(queries)) as pool:
        responses = list(pool.map(lambda q: post(f"{service}/rerank", {"query": q, "documents": DOCS[:3]}), queries))
    after = handle.stats.remote().result()
    chunks = after["chunks"] - before["chunks"]
    batches = after["batches"] - before["batches"]
    assert chunks == len(queries)
    assert batches < chunks, (batches, chunks)  # several requests' chunks ran in one batch
    assert after["max_chunks_in_batch"] >= 2
    for q, r in zip(queries, responses):
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        close([got[i] for i in range(3)], reranker.score(q, DOCS[:3]))
    # Batch invariance: each request alone gets the very same numbers it got batched with others.
    for q, r in zip(queries, responses):
        alone = post(f"{service}/rerank", {"query": q, "documents": DOCS[:3]}).json()["results"]
        assert alone == r.json()["results"]


@pytest.fixture(scope="module")
def secure_service(ray_cluster, tiny_checkpoint):
    # Keys from an environment variable reach the ingress the way a deployment passes them.
    env = {"env_vars": {"TEST_RERANK_KEYS": "env-key-1, env-key-2"}}
    args = app_args(
        tiny_checkpoint,
        api_keys=["secret-key"],
        api_keys_env="TEST_RERANK_KEYS",
        ingress={"ray_actor_options": {"num_cpus": 0, "runtime_env": env}},
    )
    serve.run(build_app(args), name="secure", route_prefix="/secure")
    yield f"{ray_cluster}/secure"
    serve.delete("secure")


def test_api_keys_guard_every_route_but_health(secure_service):
    body = {"query": QUERY, "documents": DOCS[:2], "model": "tiny"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret-key"}):
        r = post(f"{secure_service}/rerank", body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
        assert "secret-key" not in r.text
        assert requests.get(f"{secure_service}/v1/models", headers=headers, timeout=10).status_code == 401
    assert requests.get(f"{secure_service}/health", timeout=10).status_code == 200
    for key in ("secret-key", "env-key-2"):
        r = post(f"{secure_service}/v2/rerank", body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, (key, r.text)


def test_api_keys_guard_the_dialect_routes_in_their_error_shape(secure_service):
    # Elasticsearch, Weaviate and OpenSearch read `error` as a string (or show the body as text).
    body = {"query": QUERY, "documents": DOCS[:2]}
    for path in ("/elasticsearch/rerank", "/weaviate/rerank", "/opensearch/rerank"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = post(f"{secure_service}{path}", body, headers=headers)
            assert r.status_code == 401, (path, r.text)
            assert r.json() == {"error": "missing or invalid bearer token", "error_type": "unauthorized"}
            assert r.headers["www-authenticate"] == "Bearer"
        r = post(f"{secure_service}{path}", body, headers={"Authorization": "Bearer secret-key"})
        assert r.status_code == 200, (path, r.text)
    assert requests.get(f"{secure_service}/weaviate/meta", timeout=10).status_code == 401
    # Weaviate's module sends no credentials to its readiness probe: it stays open.
    assert requests.get(f"{secure_service}/weaviate/.well-known/ready", timeout=10).status_code == 204


@pytest.fixture
def slow_service(ray_cluster, tiny_checkpoint):
    """One model replica taking one chunk at a time, each batch waiting 1 s, a queue of 1."""

    def start(**overrides):
        model = {
            "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 1.0},
            "deployment": {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 1, "max_queued_requests": 1},
        }
        args = app_args(tiny_checkpoint, model=model, retry_after_s=7, **overrides)
        serve.run(build_app(args), name="slow", route_prefix="/slow")
        return f"{ray_cluster}/slow"

    yield start
    serve.delete("slow")


def test_back_pressure_answers_503_with_retry_after(slow_service):
    url = slow_service()
    body = {"query": QUERY, "documents": DOCS[:2]}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: post(f"{url}/rerank", body), range(6)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503}, codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers["Retry-After"] == "7"
            assert r.json()["error"]["type"] == "overloaded"
    assert post(f"{url}/rerank", body).status_code == 200  # and it recovers


def test_request_timeout_answers_504(slow_service):
    url = slow_service(request_timeout_s=0.3)
    r = post(f"{url}/rerank", {"query": QUERY, "documents": DOCS[:2]})
    assert r.status_code == 504
    assert r.json()["error"] == {"message": "model 'tiny' did not answer within 0.3 s", "type": "timeout", "code": 504}
