"""The clients of search stacks, pointed at the service: real packages where pip installs them,
else the exact bodies their source builds, parsed the way their source parses the answer.

docs/clients.md names the source (file and version) each wire-format test follows.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

# LiteLLM fetches a model price list from GitHub at import (three tries, about 7 s) unless told to
# use the copy it ships; no test machine needs the remote one.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
import requests
from ray import serve

from deployments.app import build_app
from tests.service_helpers import app_args, close, post
from tests.test_engine import DOCS, QUERY

pytestmark = pytest.mark.slow

INSTRUCTION = "Given a code question, retrieve code that answers it"
# The name docs/clients.md and configs/serve*.yaml use.
MODEL = "qwen3-reranker-0.6b"
DOC = Path(__file__).resolve().parents[1] / "docs" / "clients.md"
DOC_HOST = "http://rerank:8000"


def doc_block(kind: str, name: str, language: str, service: str) -> str:
    """The ``language`` block marked ``<!-- kind: name -->`` in docs/clients.md, pointed at ``service``."""
    pattern = rf"<!-- {kind}: {re.escape(name)} -->\n```{language}\n(.*?)\n```"
    match = re.search(pattern, DOC.read_text(), re.S)
    assert match, f"docs/clients.md has no {kind} block {name!r}"
    return match.group(1).replace(DOC_HOST, service)


def doc_config(name: str, service: str) -> dict:
    return json.loads(doc_block("config", name, "json", service))


@pytest.fixture(scope="module")
def service(ray_cluster, tiny_checkpoint):
    serve.run(build_app(app_args(tiny_checkpoint, model={"name": MODEL})), name="clients", route_prefix="/")
    yield ray_cluster
    serve.delete("clients")


@pytest.fixture(scope="module")
def expected(reranker):
    """The engine's scores of DOCS for QUERY, and their order (best first, ties by lower index)."""
    scores = reranker.score(QUERY, DOCS)
    return scores, sorted(range(len(DOCS)), key=lambda i: (-scores[i], i))


def by_score(pairs):
    """Sort ``(index, score)`` by score, best first, stably: as Java's sorted(...reversed()) does."""
    return sorted(pairs, key=lambda p: -p[1])


def json_path(body, path: str) -> list:
    """Elasticsearch's MapPathExtractor for the ``$.field[*].field`` paths the configs use."""
    head, _, tail = path.removeprefix("$.").partition("[*].")
    return [item[tail] for item in body[head]]


# Elasticsearch -----------------------------------------------------------------------------


def es_hugging_face_parse(response: requests.Response, top_n: int | None) -> list[tuple[int, float, str | None]]:
    """HuggingFaceRerankResponseEntity.fromResponse: a bare array of objects whose only keys are
    index, score / relevance_score, text and document {text} (any other key throws), sorted by
    score descending and cut to top_n; errors read `error` as a string."""
    if response.status_code != 200:
        error = response.json().get("error")
        assert isinstance(error, str), response.text
        raise RuntimeError(error)
    body = response.json()
    assert isinstance(body, list)
    docs = []
    for item in body:
        assert set(item) <= {"index", "score", "relevance_score", "text", "document"}, item
        score = item.get("score", item.get("relevance_score"))
        text = item.get("text", (item.get("document") or {}).get("text"))
        docs.append((item["index"], score, text))
    docs = sorted(docs, key=lambda d: -d[1])
    return docs if top_n is None else docs[:top_n]


def test_elasticsearch_hugging_face_config_and_both_bodies(service, expected):
    # HuggingFaceRerankRequestEntity: 8.19 / 9.1 post `texts` and `return_text`, later versions
    # `documents`, `return_documents` and `max_chunks_per_doc`; both add `top_n`.
    scores, order = expected
    config = doc_config("es-hugging-face", service)
    assert config["service"] == "hugging_face"
    assert set(config["service_settings"]) <= {"url", "api_key", "rate_limit"}
    task = config["task_settings"]
    assert set(task) <= {"return_documents", "top_n"}
    top_n, url = task["top_n"], config["service_settings"]["url"]
    older = {"texts": DOCS, "query": QUERY, "return_text": task["return_documents"], "top_n": top_n}
    newer = {"documents": DOCS, "query": QUERY, "return_documents": task["return_documents"], "top_n": top_n,
             "max_chunks_per_doc": 1}
    for body in (older, newer):
        docs = es_hugging_face_parse(post(url, body), top_n)
        assert [d[0] for d in docs] == order[:top_n]
        close([d[1] for d in docs], [scores[i] for i in order[:top_n]])
        assert [d[2] for d in docs] == [DOCS[i] for i in order[:top_n]]


def test_elasticsearch_texts_body_on_tei_route_and_without_text(service, expected):
    scores, order = expected
    body = {"texts": DOCS, "query": QUERY, "top_n": 2}
    docs = es_hugging_face_parse(post(f"{service}/rerank", body), top_n=2)
    assert [d[0] for d in docs] == order[:2] and all(d[2] is None for d in docs)
    close([d[1] for d in docs], [scores[i] for i in order[:2]])


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"documents": [], "query": "q"}, "documents"),
        ({"texts": ["a"], "query": "q", "top_n": 0}, "top_n"),
        ({"documents": ["a"], "query": "q", "return_text": True}, "return_text"),
        ({"texts": ["a"], "query": " "}, "blank"),
    ],
)
def test_elasticsearch_errors_are_a_string_it_reads(service, body, fragment):
    r = post(f"{service}/elasticsearch/rerank", body)
    assert r.status_code == 422
    with pytest.raises(RuntimeError, match=fragment):
        es_hugging_face_parse(r, top_n=None)


def test_elasticsearch_custom_service_config(service, expected):
    # The `custom` service fills ${...} of its request template with JSON values and reads the
    # answer with its json_parser paths, as RerankResponseParser does.
    scores, order = expected
    settings = doc_config("es-custom", service)["service_settings"]
    secrets = settings["secret_parameters"]
    filled = (settings["request"].replace("${query}", json.dumps(QUERY)).replace("${input}", json.dumps(DOCS))
              .replace("${top_n}", "5"))
    headers = {k: v.replace("${api_key}", secrets["api_key"]) for k, v in settings["headers"].items()}
    r = requests.post(settings["url"], data=filled, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    parser = settings["response"]["json_parser"]
    assert json_path(r.json(), parser["reranked_index"]) == order[:5]
    close(json_path(r.json(), parser["relevance_score"]), [scores[i] for i in order[:5]])


# OpenSearch ----------------------------------------------------------------------------------


def opensearch_rerank(response_body, post_process: str, num_documents: int) -> list[float]:
    """MLPostProcessFunction + CohereRerankPostProcessFunction: `$.results` (cohere.rerank) or
    `$[*]` (default.rerank), each result's relevance_score put at its index; the rerank
    processor then needs one score per document."""
    results = response_body["results"] if post_process == "connector.post_process.cohere.rerank" else response_body
    assert {"index", "relevance_score"} <= set(results[0])
    scores = [None] * len(results)
    for item in results:
        scores[item["index"]] = item["relevance_score"]
    assert len(scores) == num_documents and None not in scores
    return scores


def call_connector(name: str, service: str, documents: list[str], query: str) -> requests.Response:
    """The docs' connector ``name`` called as ml-commons calls it: its request_body with
    ${parameters.*} filled from the connector's parameters and what the rerank pre-process function
    sets (documents, query, top_n = the number of documents), its headers' credential filled."""
    connector = doc_config(name, service)
    action = connector["actions"][0]
    params = {**connector["parameters"], "documents": json.dumps(documents), "query": query,
              "top_n": str(len(documents))}
    filled = re.sub(r"\$\{parameters\.(\w+)\}", lambda m: params[m.group(1)], action["request_body"])
    headers = {k: v.replace("${credential.api_key}", connector["credential"]["api_key"])
               for k, v in action["headers"].items()}
    return requests.request(action["method"], action["url"], data=filled, headers=headers, timeout=60)


@pytest.mark.parametrize("name, post_process", [
    ("opensearch-connector", "connector.post_process.cohere.rerank"),
    ("opensearch-default-connector", "connector.post_process.default.rerank"),
])
def test_opensearch_rerank_connectors(service, expected, name, post_process):
    scores, order = expected
    assert doc_config(name, service)["actions"][0]["post_process_function"] == post_process
    r = call_connector(name, service, DOCS, QUERY)
    assert r.status_code == 200, r.text
    close(opensearch_rerank(r.json(), post_process, len(DOCS)), scores)
    results = r.json()["results"] if post_process.endswith("cohere.rerank") else r.json()
    # The function casts each score to Double: a JSON number with a fraction, never an integer.
    assert all(isinstance(item["relevance_score"], float) for item in results)
    assert [item["index"] for item in results] == order  # best first, as Cohere's answer


@pytest.mark.parametrize("body, fragment", [({"query": "q", "documents": []}, "documents"),
                                            ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
                                            ({"query": "q", "documents": ["a"], "texts": ["a"]}, "texts"),
                                            ({"query": "q", "documents": ["a"], "model": "absent"}, "absent")])
def test_opensearch_default_rerank_errors_are_a_short_string(service, body, fragment):
    # ml-commons fails the search with "Error from remote service: " + the body as text.
    r = post(f"{service}/opensearch/rerank", body)
    assert r.status_code in (404, 422), r.text
    assert isinstance(r.json()["error"], str) and fragment in r.json()["error"]


# Weaviate ------------------------------------------------------------------------------------


def test_weaviate_reranker_transformers(service, reranker):
    # modules/reranker-transformers/clients: GET {origin}/.well-known/ready (any status <= 299),
    # then POST {origin}/rerank with RankInput {query, documents, property} in chunks of 32, the
    # scores of each chunk concatenated and taken in order.
    origin = doc_config("weaviate-transformers", service)["RERANKER_INFERENCE_API"]
    assert requests.get(f"{origin}/.well-known/ready", timeout=30).status_code <= 299
    docs = [f"{i}: {DOCS[i % len(DOCS)]}" for i in range(40)]
    got = []
    for start in range(0, len(docs), 32):
        chunk = docs[start:start + 32]
        r = post(f"{origin}/rerank", {"query": QUERY, "documents": chunk, "property": ""})
        assert r.status_code == 200, r.text
        got += r.json()["scores"]
    assert [s["document"] for s in got] == docs
    close([s["score"] for s in got], reranker.score(QUERY, docs))
    # ranker_meta.go: GET {origin}/meta, any JSON object, shown in Weaviate's /v1/meta.
    meta = requests.get(f"{origin}/meta", timeout=30)
    assert meta.status_code == 200, (meta.status_code, meta.headers, meta.text)
    meta = meta.json()
    assert [m["id"] for m in meta["data"]] == [MODEL]


@pytest.mark.parametrize("body, fragment", [({"query": "q", "documents": []}, "documents"),
                                            ({"query": "q", "documents": ["a"], "top_n": 1}, "top_n"),
                                            ({"query": "q"}, "documents")])
def test_weaviate_errors_are_the_string_it_reads(service, body, fragment):
    # RankResponse.Error is a string: "fail with status %d: %s".
    r = post(f"{service}/weaviate/rerank", body)
    assert r.status_code == 422
    assert isinstance(r.json()["error"], str) and fragment in r.json()["error"]


def test_weaviate_reranker_cohere(service, expected):
    # modules/reranker-cohere/clients: POST {baseURL}/v2/rerank with RankInput, results put at
    # their index; an error's `message` is what it reports.
    scores, _ = expected
    settings = doc_config("weaviate-cohere", service)["reranker-cohere"]
    url = f"{settings['baseURL']}/v2/rerank"
    r = post(url, {"documents": DOCS, "query": QUERY, "model": settings["model"], "return_documents": False})
    assert r.status_code == 200, r.text
    placed = [None] * len(r.json()["results"])
    for result in r.json()["results"]:
        placed[result["index"]] = result["relevance_score"]
    close(placed, scores)
    r = post(url, {"documents": DOCS, "query": QUERY, "model": "absent", "return_documents": False})
    assert r.status_code == 404 and "model 'absent'" in r.json()["message"]


# Milvus --------------------------------------------------------------------------------------


def test_milvus_tei_ranker(service, reranker):
    # models/tei/tei.go: POST {endpoint with path /rerank} {query, texts, truncate, truncation_direction}
    # per batch of max_client_batch_size, [{index, score}] sorted by index.
    params = doc_config("milvus-tei", service)
    query, docs = params["queries"][0], [f"{i}: {DOCS[i % len(DOCS)]}" for i in range(40)]
    got = []
    for start in range(0, len(docs), params["max_client_batch_size"]):
        body = {"query": query, "texts": docs[start:start + params["max_client_batch_size"]],
                "truncate": params["truncate"], "truncation_direction": params["truncation_direction"]}
        r = post(f"{params['endpoint']}/rerank", body)
        assert r.status_code == 200, r.text
        got += [x["score"] for x in sorted(r.json(), key=lambda x: x["index"])]
    close(got, reranker.score(query, docs))


def test_milvus_vllm_ranker(service, reranker):
    # models/vllm/vllm_client.go: POST {endpoint with path /rerank} {query, documents,
    # truncate_prompt_tokens} (no model), results sorted by index.
    params = doc_config("milvus-vllm", service)
    query, limit = params["queries"][0], params["truncate_prompt_tokens"]
    docs = ["rivers and mountains " * 40, DOCS[0]]
    r = post(f"{params['endpoint']}/rerank", {"query": query, "documents": docs, "truncate_prompt_tokens": limit})
    assert r.status_code == 200, r.text
    got = [x["relevance_score"] for x in sorted(r.json()["results"], key=lambda x: x["index"])]
    cut = reranker.encoder.encode_windows(query, docs, max_pair_tokens=limit).encoded
    assert max(cut.pair_lengths()) == limit
    close(got, reranker.score_encoded([cut])[0])
    assert got[0] != pytest.approx(reranker.score(query, docs[:1])[0], abs=1e-6)
    r = post(f"{params['endpoint']}/rerank", {"query": query, "documents": docs, "truncate_prompt_tokens": 0})
    assert r.status_code == 422 and "truncate_prompt_tokens" in r.json()["error"]["message"]


# Python clients, real packages ---------------------------------------------------------------


def test_pymilvus_model_tei_rerank_function(service, expected):
    # pymilvus.model.reranker.TEIRerankFunction: POST {api_url}/rerank {query, return_text, texts};
    # the first 5 results as RerankResult(text, score, index); a body with `error` raises.
    from pymilvus.model.reranker import TEIRerankFunction

    scores, order = expected
    results = TEIRerankFunction(api_url=service)(QUERY, DOCS)
    assert [r.index for r in results] == order[:5] and [r.text for r in results] == [DOCS[i] for i in order[:5]]
    close([r.score for r in results], [scores[i] for i in order[:5]])
    with pytest.raises(RuntimeError, match="texts"):
        TEIRerankFunction(api_url=service)(QUERY, [])


def test_cohere_v1_client(service, expected):
    cohere = pytest.importorskip("cohere")
    scores, order = expected
    client = cohere.Client(api_key="unused", base_url=service)
    response = client.rerank(model=MODEL, query=QUERY, documents=DOCS, top_n=3, return_documents=True)
    assert [x.index for x in response.results] == order[:3]
    close([x.relevance_score for x in response.results], [scores[i] for i in order[:3]])
    assert [x.document.text for x in response.results] == [DOCS[i] for i in order[:3]]
    assert response.meta.api_version.version == "1" and response.meta.billed_units.search_units == 1
    with pytest.raises(cohere.errors.NotFoundError) as e:
        client.rerank(model="absent", query=QUERY, documents=DOCS)
    assert "model 'absent'" in e.value.body["message"]


def test_langchain_cohere_rerank(service, reranker, expected):
    langchain_cohere = pytest.importorskip("langchain_cohere")
    from langchain_core.documents import Document

    scores, order = expected
    ranker = langchain_cohere.CohereRerank(base_url=service, cohere_api_key="unused", model=MODEL, top_n=3)
    kept = ranker.compress_documents([Document(page_content=d) for d in DOCS], QUERY)
    assert [d.page_content for d in kept] == [DOCS[i] for i in order[:3]]
    close([d.metadata["relevance_score"] for d in kept], [scores[i] for i in order[:3]])
    long_doc = "rivers and mountains " * 50
    cut = ranker.rerank([long_doc, DOCS[0]], QUERY, top_n=None, max_tokens_per_doc=5)
    got = {x["index"]: x["relevance_score"] for x in cut}
    encoded = reranker.encoder.encode(QUERY, [long_doc, DOCS[0]], max_document_tokens=5)
    close([got[0], got[1]], reranker.score_encoded([encoded])[0])


def test_llama_index_cohere_rerank(service, expected):
    cohere_rerank = pytest.importorskip("llama_index.postprocessor.cohere_rerank")
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    scores, order = expected
    ranker = cohere_rerank.CohereRerank(api_key="unused", base_url=service, model=MODEL, top_n=3)
    nodes = ranker.postprocess_nodes([NodeWithScore(node=TextNode(text=d)) for d in DOCS], QueryBundle(QUERY))
    assert [n.node.text for n in nodes] == [DOCS[i] for i in order[:3]]
    close([n.score for n in nodes], [scores[i] for i in order[:3]])


def test_llama_index_tei_rerank(service, expected):
    tei_rerank = pytest.importorskip("llama_index.postprocessor.tei_rerank")
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

    scores, order = expected
    ranker = tei_rerank.TextEmbeddingInference(base_url=service, top_n=4)
    nodes = ranker.postprocess_nodes([NodeWithScore(node=TextNode(text=d)) for d in DOCS], QueryBundle(QUERY))
    assert [n.node.text for n in nodes] == [DOCS[i] for i in order[:4]]
    close([n.score for n in nodes], [scores[i] for i in order[:4]])


def test_litellm_hosted_vllm_rerank_passes_instruction(service, reranker):
    litellm = pytest.importorskip("litellm")
    expected = reranker.score(QUERY, DOCS, instruction=INSTRUCTION)
    order = sorted(range(len(DOCS)), key=lambda i: (-expected[i], i))
    response = litellm.rerank(model=f"hosted_vllm/{MODEL}", api_base=f"{service}/v1", query=QUERY, documents=DOCS,
                              top_n=3, instruction=INSTRUCTION)
    assert [x["index"] for x in response.results] == order[:3]
    close([x["relevance_score"] for x in response.results], [expected[i] for i in order[:3]])
    assert [x["document"]["text"] for x in response.results] == [DOCS[i] for i in order[:3]]
    with pytest.raises(litellm.exceptions.NotFoundError, match="model 'absent'"):
        litellm.rerank(model="hosted_vllm/absent", api_base=f"{service}/v1", query=QUERY, documents=DOCS)


@pytest.mark.parametrize(
    "name, package",
    [("cohere-v1", "cohere"), ("langchain", "langchain_cohere"), ("litellm", "litellm"),
     ("llama-index-cohere", "llama_index.postprocessor.cohere_rerank"),
     ("llama-index-tei", "llama_index.postprocessor.tei_rerank"),
     ("pymilvus-model-tei", "pymilvus.model.reranker")],
)
def test_the_python_snippets_of_the_docs_rank_as_the_engine(service, reranker, name, package):
    pytest.importorskip(package)
    namespace = {}
    exec(doc_block("snippet", name, "python", service).replace("<key>", "unused"), namespace)
    scores = reranker.score(namespace["query"], namespace["documents"], instruction=namespace.get("instruction"))
    ranked = namespace["ranked"]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:len(ranked)]
    assert len(ranked) == 2 and [i for i, _ in ranked] == order
    close([score for _, score in ranked], [scores[i] for i in order])


def test_openapi_documents_the_dialect_routes_and_their_error_bodies(service):
    spec = requests.get(f"{service}/openapi.json", timeout=10).json()
    for path in ("/elasticsearch/rerank", "/weaviate/rerank", "/opensearch/rerank"):
        schema = spec["paths"][path]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith("/StringErrorResponse")
    assert "204" in spec["paths"]["/weaviate/.well-known/ready"]["get"]["responses"]


# The JSON layer ------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b'{"query": "q",\n "documents": ["a",]}', b"{not json", b'{"query": "q"} x'])
def test_a_json_body_that_does_not_parse_says_what_and_where(service, data):
    with pytest.raises(json.JSONDecodeError) as parsed:
        json.loads(data)
    r = requests.post(f"{service}/rerank", data=data, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422, r.text
    e = parsed.value
    assert r.json()["error"]["message"] == (
        f"the body is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno} (char {e.pos})"
    )


def test_an_empty_json_body_is_told_to_send_an_object(service):
    r = requests.post(f"{service}/rerank", data=b"", headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["message"] == "the body is empty: send a JSON object"
