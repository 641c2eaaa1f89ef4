"""Autoscaling under sustained load: model replicas go from 1 to at least 2 and back to 1 while
every request answers 200 with the engine's scores, those in flight on draining replicas included."""

from __future__ import annotations

import time

import pytest
from ray import serve

from deployments.app import build_app, model_deployment_name
from tests.reliability.conftest import report
from tests.reliability.load import (
    REPLICA_START_DEADLINE_S,
    Load,
    assert_all_correct,
    p50_ms,
    replica_states,
    wait_until,
)
from tests.service_helpers import app_args
from tests.test_engine import DOCS, QUERY

APP = "autoscale"
DEPLOYMENT = model_deployment_name("tiny")
HEAVY_CLIENTS = 4
# Short delays and windows, so that the whole cycle takes seconds instead of minutes.
# Each request of 9 documents is 3 chunks (chunk_pairs 4): 4 clients keep up to 12 chunks in
# flight, 3 per replica wanted at most; one client keeps at most 3, which one replica covers.
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 3,
    "target_ongoing_requests": 4,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2,
    "upscale_delay_s": 1,
    # Long enough to ride out dips in the measured load while new replicas start (a replica's
    # process has taken over 30 s to start on a loaded machine): a shorter delay let Serve
    # stop them again before they ran.
    "downscale_delay_s": 10,
}


@pytest.fixture(scope="module")
def autoscaled(ray_cluster, tiny_checkpoint):
    model = {
        "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.05},
        "deployment": {
            "ray_actor_options": {"num_cpus": 0},
            "max_ongoing_requests": 16,
            "autoscaling_config": AUTOSCALING,
            # A replica being removed stops taking calls, then finishes those it holds.
            "graceful_shutdown_wait_loop_s": 0.5,
            "graceful_shutdown_timeout_s": 20,
        },
    }
    serve.run(build_app(app_args(tiny_checkpoint, model=model)), name=APP, route_prefix=f"/{APP}")
    yield f"{ray_cluster}/{APP}"
    serve.delete(APP)


def test_scales_up_under_load_and_back_down_without_a_failed_request(autoscaled, reranker):
    expected = reranker.score(QUERY, DOCS)
    assert replica_states(APP, DEPLOYMENT) == {"RUNNING": 1}
    peak = 1

    def running(at_least=None, exactly=None):
        nonlocal peak
        states = replica_states(APP, DEPLOYMENT)
        n = states.get("RUNNING", 0)
        peak = max(peak, n)
        return n >= at_least if at_least is not None else states == {"RUNNING": exactly}

    load = Load(f"{autoscaled}/rerank", {"query": QUERY, "documents": DOCS}, HEAVY_CLIENTS).start()
    try:
        started = time.monotonic()
        wait_until(lambda: running(at_least=2), REPLICA_START_DEADLINE_S, "2 running replicas under load",
                   lambda: replica_states(APP, DEPLOYMENT))
        scale_up_s = time.monotonic() - started
        load.wait_for_answers(2 * HEAVY_CLIENTS)  # the new replicas take part
        # Light load from here: replicas are removed while requests keep arriving, so some
        # drain calls in flight.
        load.keep(1)
        lightened = time.monotonic()
        wait_until(lambda: running(exactly=1), REPLICA_START_DEADLINE_S, "back to 1 running replica, none stopping",
                   lambda: replica_states(APP, DEPLOYMENT))
        scale_down_s = time.monotonic() - lightened
        load.wait_for_answers(2)
    finally:
        outcomes = load.stop()
    during_scale_down = [o for o in outcomes if o.ended > lightened]
    report("autoscaling", requests=len(outcomes), failed=sum(o.status != 200 for o in outcomes),
           peak_replicas=peak, scale_up_s=round(scale_up_s, 1), scale_down_s=round(scale_down_s, 1),
           requests_during_scale_down=len(during_scale_down), p50_ms=p50_ms(outcomes))
    assert_all_correct(outcomes, expected)
    assert 2 <= peak <= AUTOSCALING["max_replicas"]
    assert during_scale_down
