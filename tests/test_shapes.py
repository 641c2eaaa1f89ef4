"""Long documents, TEI's and vLLM's shapes over real HTTP, on the tiny test checkpoint.

The application runs with a short ``max_length`` so that long documents need several windows,
and small chunks so that one document's windows are spread over several replica calls.
"""

from __future__ import annotations

import pytest
import requests
from ray import serve

from deployments.app import build_app, model_deployment_name
from rerank_core import EngineConfig, Reranker, probabilities
from tests.service_helpers import app_args, close, post
from tests.test_engine import DOCS, QUERY
from tests.test_windows import LONG, SHORT

pytestmark = pytest.mark.slow

MAX_LENGTH = 160
OVERLAP = 10


@pytest.fixture(scope="module")
def service(ray_cluster, tiny_checkpoint):
    # Served at the root: TEI clients post to the server's root /rerank whatever their URL.
    args = app_args(
        tiny_checkpoint, chunk_pairs=2, max_pairs=12,
        model={"max_length": MAX_LENGTH, "chunk_overlap_tokens": OVERLAP},
    )
    serve.run(build_app(args), name="shapes", route_prefix="/")
    yield ray_cluster
    serve.delete("shapes")


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    """The engine with the service's model settings."""
    return Reranker.load(
        str(tiny_checkpoint), device="cpu", dtype="float32", max_length=MAX_LENGTH,
        config=EngineConfig(chunk_overlap_tokens=OVERLAP),
    )


# Long documents --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank"])
def test_chunked_documents_score_their_best_window_with_spans(service, engine, path):
    docs = [SHORT, LONG, LONG[::-1]]
    body = {"query": QUERY, "documents": docs, "max_chunks_per_doc": 3, "return_spans": True}
    r = post(f"{service}{path}", body)
    assert r.status_code == 200, r.text
    results = {x["index"]: x for x in r.json()["results"]}
    expected = engine.score_windowed(engine.encode_windows(QUERY, docs, max_chunks_per_doc=3, return_spans=True))
    assert expected.windows == [1, 3, 3]  # 7 windows over chunks of 2: spread over replica calls
    close([results[i]["relevance_score"] for i in range(3)], expected.scores())
    assert [(results[i]["span"]["start"], results[i]["span"]["end"]) for i in range(3)] == expected.spans
    assert r.json()["usage"]["prompt_tokens"] == expected.tokens
    one = post(f"{service}{path}", {"query": QUERY, "documents": docs}).json()
    assert all("span" not in x for x in one["results"])
    close([{x["index"]: x["relevance_score"] for x in one["results"]}[i] for i in range(3)], engine.score(QUERY, docs))


def test_one_chunk_is_the_truncated_score(service, engine):
    r = post(f"{service}/rerank", {"query": QUERY, "documents": [LONG, SHORT], "max_chunks_per_doc": 1})
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    close([got[0], got[1]], engine.score_encoded([engine.encode(QUERY, [LONG, SHORT])])[0])
    assert r.json()["usage"]["prompt_tokens"] == engine.encode(QUERY, [LONG, SHORT]).num_tokens()


def test_cohere_v2_chunks_within_max_tokens_per_doc(service, engine):
    body = {"model": "tiny", "query": QUERY, "documents": [LONG, SHORT], "max_tokens_per_doc": 30,
            "max_chunks_per_doc": 4}
    r = post(f"{service}/v2/rerank", body)
    assert r.status_code == 200, r.text
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    windowed = engine.encode_windows(QUERY, [LONG, SHORT], max_chunks_per_doc=4, max_tokens_per_doc=30)
    expected = engine.score_windowed(windowed)
    assert expected.windows == [4, 1]
    close([got[0], got[1]], expected.scores())
    assert r.json()["meta"]["tokens"]["input_tokens"] == expected.tokens


@pytest.mark.parametrize(
    "path,body,status,fragment",
    [
        ("/rerank", {"query": QUERY, "documents": [LONG] * 3, "max_chunks_per_doc": 5}, 413,
         "3 documents make 15 (query, window) pairs; the limit is max_pairs=12"),
        ("/v2/rerank", {"model": "tiny", "query": QUERY, "documents": [LONG], "max_tokens_per_doc": 5,
                        "max_chunks_per_doc": 2}, 422, "chunk overlap (10 tokens) must be"),
        ("/rerank", {"query": QUERY, "documents": ["a"], "max_chunks_per_doc": 0}, 422, "max_chunks_per_doc"),
        ("/rerank", {"query": QUERY, "documents": ["a"], "max_chunks_per_doc": "2"}, 422, "max_chunks_per_doc"),
        ("/v1/rerank", {"query": QUERY, "documents": ["a"], "return_spans": "yes"}, 422, "return_spans"),
        ("/rerank", {"query": QUERY, "texts": ["a"], "truncation_direction": "left"}, 422, "truncation_direction"),
        ("/rerank", {"query": QUERY, "texts": ["a"], "raw_scores": 1}, 422, "raw_scores"),
        ("/rerank", {"query": QUERY, "texts": ["a"], "top_k": 1}, 422, "top_k: Extra inputs are not permitted"),
        ("/rerank", {"query": QUERY, "texts": []}, 422, "texts"),
        ("/rerank", {"query": QUERY, "texts": [LONG], "truncate": False}, 413, "truncate is false"),
        ("/score", {"text_1": ["a", "b", "c"], "text_2": ["x", "y"]}, 422, "3 queries and 2 documents"),
        ("/v1/score", {"text_1": "a"}, 422, "give text_1 and text_2, or queries and documents"),
        ("/score", {"text_1": "a", "documents": ["x"]}, 422, "give text_1 and text_2"),
        ("/score", {"text_1": "a", "text_2": ["x"], "truncate_prompt_tokens": "9"}, 422, "truncate_prompt_tokens"),
        ("/score", {"text_1": "a", "text_2": ["x"], "truncate_prompt_tokens": 0}, 422, "truncate_prompt_tokens"),
        ("/score", {"text_1": "a", "text_2": ["x"], "model": "nope"}, 404, "model 'nope'"),
        ("/score", {"text_1": "a", "text_2": ["x"] * 51}, 413, "51 documents; the limit is 50"),
    ],
)
def test_limits_and_bad_input_are_json_errors(service, path, body, status, fragment):
    r = post(f"{service}{path}", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and fragment in error["message"], error


# TEI ----------------------------------------------------------------------------------------


def test_tei_body_gets_teis_answer(service, engine):
    r = post(f"{service}/rerank", {"query": QUERY, "texts": DOCS[:4], "return_text": True})
    assert r.status_code == 200, r.text
    expected = engine.score(QUERY, DOCS[:4])
    order = sorted(range(4), key=lambda i: (-expected[i], i))
    assert [x["index"] for x in r.json()] == order
    close([x["score"] for x in r.json()], [expected[i] for i in order])
    assert [x["text"] for x in r.json()] == [DOCS[i] for i in order]
    plain = post(f"{service}/rerank", {"query": QUERY, "texts": DOCS[:4], "truncate": None}).json()
    assert [set(x) for x in plain] == [{"index", "score"}] * 4


def test_tei_raw_scores_are_the_logit_difference(service, engine):
    r = post(f"{service}/rerank", {"query": QUERY, "texts": DOCS[:4], "raw_scores": True})
    raw = {x["index"]: x["score"] for x in r.json()}
    expected = engine.score(QUERY, DOCS[:4], raw_scores=True)
    close([raw[i] for i in range(4)], expected)
    assert probabilities(expected) == engine.score(QUERY, DOCS[:4])
    assert any(not 0 <= x <= 1 for x in expected)  # logits, not probabilities


def test_tei_truncation_left_keeps_the_documents_end(service, engine):
    right = post(f"{service}/rerank", {"query": QUERY, "texts": [LONG], "truncate": True}).json()[0]["score"]
    left = post(f"{service}/rerank", {"query": QUERY, "texts": [LONG], "truncation_direction": "Left"}).json()
    windowed = engine.encode_windows(QUERY, [LONG], truncation_side="left")
    tail = engine.score_encoded([windowed.encoded])[0][0]
    close([left[0]["score"], right], [tail, engine.score(QUERY, [LONG])[0]])
    assert abs(tail - right) > 1e-4


def test_haystack_tei_ranker_works_unchanged(service, engine, monkeypatch):
    monkeypatch.setenv("HAYSTACK_TELEMETRY_ENABLED", "False")
    ranker_module = pytest.importorskip("haystack_integrations.components.rankers.huggingface_api")
    from haystack import Document

    documents = [Document(content=text) for text in DOCS[:5]]
    ranker = ranker_module.HuggingFaceTEIRanker(url=f"{service}/some/base/", top_k=3, token=None)
    ranked = ranker.run(query=QUERY, documents=documents)["documents"]
    expected = engine.score(QUERY, DOCS[:5])
    order = sorted(range(5), key=lambda i: (-expected[i], i))[:3]
    assert [d.content for d in ranked] == [DOCS[i] for i in order]
    close([d.score for d in ranked], [expected[i] for i in order])
    left = ranker.run(query=QUERY, documents=[Document(content=LONG)],
                      truncation_direction=ranker_module.TruncationDirection.LEFT)["documents"]
    tail = engine.encode_windows(QUERY, [LONG], truncation_side="left")
    close([left[0].score], engine.score_encoded([tail.encoded])[0])


def test_openapi_documents_both_rerank_shapes_and_score(service):
    spec = requests.get(f"{service}/openapi.json", timeout=10).json()
    body = spec["paths"]["/rerank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    refs = {item["$ref"].rsplit("/", 1)[1] for item in body["oneOf"]}
    assert refs == {"RerankRequest", "TeiRerankRequest"}
    answer = spec["paths"]["/rerank"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert len(answer["anyOf"]) == 2
    for path in ("/score", "/v1/score"):
        assert {"200", "404", "413", "422"} <= set(spec["paths"][path]["post"]["responses"])


# vLLM score ---------------------------------------------------------------------------------


def test_score_one_query_many_documents_in_input_order(service, engine):
    r = post(f"{service}/score", {"model": "tiny", "text_1": QUERY, "text_2": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "tiny" and body["id"].startswith("score-")
    assert isinstance(body["created"], int)
    assert [x["index"] for x in body["data"]] == list(range(len(DOCS)))
    assert {x["object"] for x in body["data"]} == {"score"}
    close([x["score"] for x in body["data"]], engine.score(QUERY, DOCS))
    assert body["usage"]["prompt_tokens"] == engine.encode(QUERY, DOCS).num_tokens()


def test_score_many_pairs_equal_one_query_at_a_time(service, engine):
    other = "Which rivers flow through towns?"
    queries = [QUERY, other, QUERY, other, "a third query", QUERY]
    documents = [DOCS[0], DOCS[1], DOCS[2], LONG, DOCS[4], SHORT]
    r = post(f"{service}/v1/score", {"queries": queries, "documents": documents})
    assert r.status_code == 200, r.text
    got = [x["score"] for x in r.json()["data"]]
    for query in set(queries):
        idx = [i for i, q in enumerate(queries) if q == query]
        close([got[i] for i in idx], engine.score(query, [documents[i] for i in idx]))
    close(got, engine.score_pairs(list(zip(queries, documents))))
    one = post(f"{service}/score", {"text_1": [other], "text_2": [DOCS[1], LONG]}).json()["data"]
    close([x["score"] for x in one], [got[1], got[3]])


def test_score_many_distinct_queries_share_forward_passes(service, engine):
    handle = serve.get_deployment_handle(model_deployment_name("tiny"), app_name="shapes")
    before = handle.stats.remote().result()
    queries = [f"question {i} about rivers" for i in range(8)]
    documents = [DOCS[i % len(DOCS)] for i in range(8)]
    r = post(f"{service}/score", {"text_1": queries, "text_2": documents})
    assert r.status_code == 200, r.text
    after = handle.stats.remote().result()
    chunks, batches = after["chunks"] - before["chunks"], after["batches"] - before["batches"]
    assert chunks == 8 and batches < chunks, (chunks, batches)  # one chunk per query, batched together
    assert after["forward_passes"] - before["forward_passes"] < 8
    close([x["score"] for x in r.json()["data"]], [engine.score(q, [d])[0] for q, d in zip(queries, documents)])


def test_score_instruction_and_prompt_truncation(service, engine):
    instruction = "Given a code question, retrieve code that answers it"
    body = {"text_1": QUERY, "text_2": [LONG, DOCS[4]], "instruction": instruction, "truncate_prompt_tokens": 120}
    r = post(f"{service}/score", body)
    assert r.status_code == 200, r.text
    cut = engine.encoder.encode_windows(QUERY, [LONG, DOCS[4]], instruction, max_pair_tokens=120)
    assert max(cut.encoded.pair_lengths()) == 120
    close([x["score"] for x in r.json()["data"]], engine.score_encoded([cut.encoded])[0])
    full = post(f"{service}/score", {**body, "truncate_prompt_tokens": -1}).json()["data"]
    close([x["score"] for x in full], engine.score(QUERY, [LONG, DOCS[4]], instruction))
