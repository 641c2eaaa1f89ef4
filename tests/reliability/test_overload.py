"""A burst several times the service's capacity: shed cleanly with 503 + Retry-After, never fail."""

from __future__ import annotations

import collections
import concurrent.futures

import pytest
import requests
from ray import serve

from deployments.app import build_app
from tests.reliability.conftest import report
from tests.service_helpers import app_args, close
from tests.test_engine import DOCS, QUERY

BURST = 48


@pytest.fixture(scope="module")
def small_service(ray_cluster, tiny_checkpoint):
    model = {"batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.05}}
    ingress = {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 2 * BURST}
    args = app_args(
        tiny_checkpoint, model=model, ingress=ingress, max_concurrent_requests=4, retry_after_s=2,
        request_timeout_s=30,
    )
    serve.run(build_app(args), name="overload", route_prefix="/overload")
    yield f"{ray_cluster}/overload"
    serve.delete("overload")


def _call(url, query):
    try:
        return requests.post(f"{url}/rerank", json={"query": query, "documents": DOCS}, timeout=60)
    except requests.RequestException as e:  # a reset or a hang is a failure of the test, counted
        return e


def test_burst_is_shed_with_503_and_served_correctly(small_service, reranker):
    queries = [f"{QUERY} #{i % 4}" for i in range(BURST)]
    with concurrent.futures.ThreadPoolExecutor(BURST) as pool:
        responses = list(pool.map(lambda q: _call(small_service, q), queries))
    outcomes = collections.Counter(
        type(r).__name__ if isinstance(r, Exception) else r.status_code for r in responses
    )
    report("overload", sent=BURST, **{str(k): v for k, v in sorted(outcomes.items(), key=str)})
    assert set(outcomes) <= {200, 503}, outcomes
    bodies = {r.text[:300] for r in responses if not isinstance(r, Exception) and r.status_code == 503}
    assert outcomes[200] > 0 and outcomes[503] > 0, (outcomes, bodies)
    expected = {q: reranker.score(q, DOCS) for q in set(queries)}
    for q, r in zip(queries, responses):
        if r.status_code == 503:
            assert r.headers.get("Retry-After") == "2"
            assert r.json()["error"]["type"] == "overloaded"
        else:
            got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
            close([got[i] for i in range(len(DOCS))], expected[q])
    after = _call(small_service, QUERY)
    assert after.status_code == 200
