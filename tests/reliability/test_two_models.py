"""Two models in one application: sustained load on one fails no request to the other and does
not hold it up; each model's chunks go only to its own replicas."""

from __future__ import annotations

import pytest
from ray import serve

from deployments.app import build_app, model_deployment_name
from deployments.args import AppArgs
from tests.reliability.conftest import report
from tests.reliability.load import Load, assert_all_correct, call, p50_ms
from tests.service_helpers import app_args
from tests.test_engine import DOCS, QUERY

APP = "twomodels"
BUSY_CLIENTS = 4
IDLE_REQUESTS = 10
CHUNKS_PER_REQUEST = 3  # 9 documents, chunk_pairs 4


@pytest.fixture(scope="module")
def two_models(ray_cluster, tiny_checkpoint):
    base = app_args(tiny_checkpoint, model={"name": "busy", "aliases": []}).model_dump()
    busy = base["models"][0]
    args = AppArgs(**{**base, "models": [busy, {**busy, "name": "idle"}]})
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    yield f"{ray_cluster}/{APP}"
    serve.delete(APP)


def _chunks_scored(model: str) -> int:
    handle = serve.get_deployment_handle(model_deployment_name(model), app_name=APP)
    return handle.stats.remote().result(timeout_s=30)["chunks"]


def _idle_requests(url) -> list:
    return [call(f"{url}/rerank", {"model": "idle", "query": QUERY, "documents": DOCS}) for _ in range(IDLE_REQUESTS)]


def test_load_on_one_model_does_not_fail_or_starve_the_other(two_models, reranker):
    expected = reranker.score(QUERY, DOCS)
    alone = _idle_requests(two_models)
    load = Load(f"{two_models}/rerank", {"model": "busy", "query": QUERY, "documents": DOCS}, BUSY_CLIENTS).start()
    try:
        load.wait_for_answers(BUSY_CLIENTS)
        under_load = _idle_requests(two_models)
        window = (under_load[0].started, under_load[-1].ended)
        busy_during = sum(1 for o in load.outcomes if window[0] < o.ended < window[1])
        load.wait_for_answers(BUSY_CLIENTS)
    finally:
        busy = load.stop()
    report("two models", idle_p50_alone_ms=p50_ms(alone), idle_p50_under_load_ms=p50_ms(under_load),
           busy_p50_ms=p50_ms(busy), busy_requests=len(busy), busy_requests_during_idle_ones=busy_during)
    assert_all_correct(alone + under_load, expected)
    assert_all_correct(busy, expected)
    # The idle model's requests really ran while the other model was under load ...
    assert busy_during >= BUSY_CLIENTS
    # ... and each model's replica scored exactly its own requests' chunks.
    assert _chunks_scored("idle") == CHUNKS_PER_REQUEST * (len(alone) + len(under_load))
    assert _chunks_scored("busy") == CHUNKS_PER_REQUEST * len(busy)
