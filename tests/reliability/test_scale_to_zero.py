"""Scale to zero: an idle model (min_replicas 0) loses its last replica; /health stays 200 and says
so without waking it, /v1/models still lists it, and the next request waits for a new replica and
succeeds (a cold start) within request_timeout_s."""

from __future__ import annotations

import time

import pytest
import requests
from ray import serve

from deployments.app import build_app, model_deployment_name
from tests.reliability.conftest import report
from tests.reliability.load import assert_all_correct, call, deployment_status, replica_states, wait_until
from tests.service_helpers import app_args
from tests.test_engine import DOCS, QUERY

APP = "zero"
DEPLOYMENT = model_deployment_name("tiny")
# Covers a cold start: usually 20-30 s here, starting a replica process and loading the model,
# but over 60 s when the 2-core machine is heavily loaded.
REQUEST_TIMEOUT_S = 180
AUTOSCALING = {
    "min_replicas": 0,
    "initial_replicas": 1,
    "max_replicas": 1,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 1,
    "upscale_delay_s": 0,
    "downscale_delay_s": 2,
    # Long enough for the checks right after a request to see the replica still up.
    "downscale_to_zero_delay_s": 10,
}
# Longer than Serve needs to react to a request (metrics push + upscale delay): had /health
# called the model, a replica would be starting by then.
QUIET_S = 4


@pytest.fixture(scope="module")
def resting(ray_cluster, tiny_checkpoint):
    model = {"deployment": {"ray_actor_options": {"num_cpus": 0}, "autoscaling_config": AUTOSCALING}}
    args = app_args(tiny_checkpoint, model=model, request_timeout_s=REQUEST_TIMEOUT_S)
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    yield f"{ray_cluster}/{APP}"
    serve.delete(APP)


def _scaled_to_zero() -> bool:
    return replica_states(APP, DEPLOYMENT) == {} and deployment_status(APP, DEPLOYMENT) == "HEALTHY"


def _health(url) -> dict:
    r = requests.get(f"{url}/health", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_scaled_to_zero_model_is_healthy_listed_and_wakes_on_a_request(resting, reranker):
    expected = reranker.score(QUERY, DOCS)
    body = {"query": QUERY, "documents": DOCS}
    warm = call(f"{resting}/rerank", body)

    idle_since = time.monotonic()
    wait_until(_scaled_to_zero, 90, "the idle model scaled to zero",
               lambda: (deployment_status(APP, DEPLOYMENT), replica_states(APP, DEPLOYMENT)))
    to_zero_s = time.monotonic() - idle_since

    # /health answers from Serve's status: healthy, the model reported resting, and not woken.
    quiet_until = time.monotonic() + QUIET_S
    while time.monotonic() < quiet_until:
        assert _health(resting) == {"status": "ok", "models": ["tiny"], "scaled_to_zero": ["tiny"]}
        time.sleep(0.5)
    assert _scaled_to_zero(), replica_states(APP, DEPLOYMENT)
    models = requests.get(f"{resting}/v1/models", timeout=30)
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["tiny"]

    cold = call(f"{resting}/rerank", body, timeout_s=REQUEST_TIMEOUT_S + 30)
    report("scale to zero", to_zero_s=round(to_zero_s, 1), cold_start_s=round(cold.latency_s, 1),
           warm_request_s=round(warm.latency_s, 2))
    # A 200, not the ingress's 504: the replica started and answered within request_timeout_s.
    assert_all_correct([warm, cold], expected)
    assert replica_states(APP, DEPLOYMENT) == {"RUNNING": 1}
    assert _health(resting)["scaled_to_zero"] == []
