"""Redeploys under load, through the declarative config path that `serve deploy` and KubeRay use:
a new ``user_config`` reaches the live replicas in place, and a change to a model argument rolls
the replicas; neither fails a request, and the new settings are in effect afterwards."""

from __future__ import annotations

import time

import pytest
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from deployments.app import model_deployment_name
from tests.reliability.conftest import report
from tests.reliability.load import (
    REPLICA_START_DEADLINE_S,
    Load,
    assert_all_correct,
    deployment_status,
    replica_actor_names,
    replica_states,
    wait_until,
)
from tests.service_helpers import app_args
from tests.test_engine import DOCS, QUERY

APP = "redeploy"
DEPLOYMENT = model_deployment_name("tiny")
REPLICAS = 2
CLIENTS = 3
FIRST_BATCHING = {"max_batch_size": 16, "batch_wait_timeout_s": 0.05}
NEW_BATCHING = {"max_batch_size": 8, "batch_wait_timeout_s": 0.02}
FIRST_MAX_BATCH_TOKENS = 8192
NEW_MAX_BATCH_TOKENS = 1024


def _deploy(checkpoint, *, batching: dict, max_batch_tokens: int) -> None:
    """Apply a Serve config with this application, as `serve deploy` or KubeRay's serveConfigV2
    would: batching goes in the deployment's ``user_config`` override, model args in ``args``."""
    model = {
        "max_batch_tokens": max_batch_tokens,
        "deployment": {
            "ray_actor_options": {"num_cpus": 0},
            "num_replicas": REPLICAS,
            "graceful_shutdown_wait_loop_s": 0.5,
            "graceful_shutdown_timeout_s": 20,
        },
    }
    # A changed args rolls the ingress too. With a single ingress replica, Serve would stop it
    # before its replacement runs, and requests would wait for that start (minutes on a loaded
    # machine, past request_timeout_s): start the replacement first, as production's two or
    # more ingress replicas do in effect.
    ingress = {"ray_actor_options": {"num_cpus": 0}, "max_surge_percent": 100}
    args = app_args(checkpoint, model=model, ingress=ingress)
    config = ServeDeploySchema(applications=[{
        "name": APP,
        "route_prefix": f"/{APP}",
        "import_path": "deployments.app:build_app",
        "args": args.model_dump(mode="json"),
        "deployments": [{"name": DEPLOYMENT, "user_config": batching}],
    }])
    # What the dashboard's PUT /api/serve/applications/ (serve deploy, KubeRay) calls.
    _get_global_client().deploy_apps(config)


def _settled(expected: dict) -> dict[str, dict] | None:
    """{actor name: settings} of every replica once the deployment runs REPLICAS replicas with
    ``expected`` settings and none other is left; else None."""
    if replica_states(APP, DEPLOYMENT) != {"RUNNING": REPLICAS} or deployment_status(APP, DEPLOYMENT) != "HEALTHY":
        return None
    names = replica_actor_names(APP, DEPLOYMENT)
    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP)
    seen = {}
    for _ in range(10 * REPLICAS):  # the router picks replicas at random: ask until all answered
        s = handle.settings.remote().result(timeout_s=30)
        seen[s.pop("actor_name")] = s
        if set(seen) == names:
            break
    if set(seen) != names or any({**s, **expected} != s for s in seen.values()):
        return None
    return seen


def _state() -> str:
    return f"{deployment_status(APP, DEPLOYMENT)} {replica_states(APP, DEPLOYMENT)}"


@pytest.fixture(scope="module")
def redeployed(ray_cluster, tiny_checkpoint):
    _deploy(tiny_checkpoint, batching=FIRST_BATCHING, max_batch_tokens=FIRST_MAX_BATCH_TOKENS)
    wait_until(lambda: _settled({**FIRST_BATCHING, "max_batch_tokens": FIRST_MAX_BATCH_TOKENS}),
               REPLICA_START_DEADLINE_S, "first deployment running", _state)
    yield f"{ray_cluster}/{APP}"
    serve.delete(APP)


def _redeploy_under_load(url, checkpoint, reranker, *, batching, max_batch_tokens, title):
    expected_settings = {**batching, "max_batch_tokens": max_batch_tokens}
    before = replica_actor_names(APP, DEPLOYMENT)
    load = Load(f"{url}/rerank", {"query": QUERY, "documents": DOCS}, CLIENTS).start()
    try:
        load.wait_for_answers(2 * CLIENTS)
        started = time.monotonic()
        _deploy(checkpoint, batching=batching, max_batch_tokens=max_batch_tokens)
        settings = wait_until(lambda: _settled(expected_settings), REPLICA_START_DEADLINE_S,
                              f"{title}: new settings on every replica", _state)
        rollout_s = time.monotonic() - started
        load.wait_for_answers(2 * CLIENTS)  # and requests keep succeeding afterwards
    finally:
        outcomes = load.stop()
    report(title, requests=len(outcomes), failed=sum(o.status != 200 for o in outcomes),
           rollout_s=round(rollout_s, 1), slowest_request_s=round(max(o.latency_s for o in outcomes), 1))
    assert_all_correct(outcomes, reranker.score(QUERY, DOCS))
    return before, set(settings)


def test_new_user_config_applies_in_place_under_load(redeployed, tiny_checkpoint, reranker):
    before, after = _redeploy_under_load(
        redeployed, tiny_checkpoint, reranker,
        batching=NEW_BATCHING, max_batch_tokens=FIRST_MAX_BATCH_TOKENS, title="redeploy user_config",
    )
    assert after == before and len(after) == REPLICAS  # the same actors: no replica restarted


def test_model_arg_change_rolls_replicas_under_load(redeployed, tiny_checkpoint, reranker):
    before, after = _redeploy_under_load(
        redeployed, tiny_checkpoint, reranker,
        batching=NEW_BATCHING, max_batch_tokens=NEW_MAX_BATCH_TOKENS, title="redeploy max_batch_tokens",
    )
    assert not after & before and len(after) == REPLICAS  # every replica replaced
