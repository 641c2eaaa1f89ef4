"""Under concurrent load a replica fills its forward passes to the configured token budget.

A pass is efficient when it is full (on a GPU a pass of a few hundred tokens leaves the chip idle
and is bound by the host's work per pass, bench/host.py). One request of a few documents fills a
small part of a pass; the replica's ``@serve.batch`` must gather the chunks of concurrent
requests so that passes come out near ``max_batch_tokens``. Scaled down to the tiny checkpoint:
a budget of 1,024 tokens, requests of about 250.
"""

from __future__ import annotations

import concurrent.futures

import pytest
from ray import serve

from deployments.app import build_app, model_deployment_name
from tests.service_helpers import app_args, post
from tests.test_engine import DOCS

BUDGET = 1024
REQUESTS = 12

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def budget_service(ray_cluster, tiny_checkpoint):
    model = {
        "name": "budget",
        "aliases": [],
        "max_batch_tokens": BUDGET,
        "max_batch_pairs": 256,
        "batching": {"max_batch_size": 256, "batch_wait_timeout_s": 0.5},
    }
    serve.run(build_app(app_args(tiny_checkpoint, model=model, chunk_pairs=8)), name="budget", route_prefix="/budget")
    yield f"{ray_cluster}/budget"
    serve.delete("budget")


def stats():
    return serve.get_deployment_handle(model_deployment_name("budget"), app_name="budget").stats.remote().result()


def test_concurrent_requests_fill_passes_to_the_token_budget(budget_service):
    documents = [DOCS[i % len(DOCS)] + f" (copy {i})" for i in range(8)]
    before = stats()
    assert post(f"{budget_service}/rerank", {"query": "alone", "documents": documents}).status_code == 200
    alone = stats()
    alone_tokens = alone["tokens"] - before["tokens"]
    assert alone_tokens < BUDGET / 2  # one request fills under half a pass
    queries = [f"question {i} about the documents" for i in range(REQUESTS)]
    with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
        responses = list(pool.map(lambda q: post(f"{budget_service}/rerank", {"query": q, "documents": documents}),
                                  queries))
    assert all(r.status_code == 200 for r in responses)
    after = stats()
    tokens, passes = after["tokens"] - alone["tokens"], after["forward_passes"] - alone["forward_passes"]
    assert tokens > 2 * BUDGET  # several passes worth
    # Passes come out most of the way to the budget: chunks of many requests share each pass.
    assert tokens / passes >= 0.7 * BUDGET, (tokens, passes)
    assert after["max_chunks_in_batch"] >= 4
