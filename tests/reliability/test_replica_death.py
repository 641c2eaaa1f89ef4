"""A model replica killed under steady load: no request fails, Serve replaces it, scores stay right."""

from __future__ import annotations

import threading
import time

import pytest
import ray
import requests
from ray import serve

from deployments.app import build_app, model_deployment_name
from tests.reliability.conftest import report
from tests.service_helpers import app_args, close
from tests.test_engine import DOCS, QUERY

CLIENTS = 6
LOAD_SECONDS = 12


@pytest.fixture(scope="module")
def two_replicas(ray_cluster, tiny_checkpoint):
    # A long batch wait keeps chunks in flight on the replicas, so the kill hits some of them.
    model = {
        "batching": {"max_batch_size": 64, "batch_wait_timeout_s": 1.0},
        "deployment": {"ray_actor_options": {"num_cpus": 0}, "num_replicas": 2},
    }
    serve.run(build_app(app_args(tiny_checkpoint, model=model)), name="death", route_prefix="/death")
    yield f"{ray_cluster}/death"
    serve.delete("death")


def _replica_names(handle, tries=40) -> set[str]:
    return {handle.actor_name.remote().result() for _ in range(tries)}


# A kill only tests the retry when it lands on chunks in flight; that is likely but a matter of
# timing, so a kill that caught none is repeated (on the replacement set) up to this many times.
KILL_ATTEMPTS = 3


def _wait_for_replacement(handle, victim) -> set[str]:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        current = _replica_names(handle, tries=20)
        if len(current) == 2 and victim not in current:
            return current
        time.sleep(1)
    return current


def _kill_under_load(url, victim) -> list:
    """Six clients for LOAD_SECONDS; ``victim`` killed a third of the way in. Returns the results."""
    results, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            try:
                results.append(requests.post(f"{url}/rerank", json={"query": QUERY, "documents": DOCS}, timeout=60))
            except requests.RequestException as e:
                results.append(e)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(LOAD_SECONDS / 3)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    time.sleep(2 * LOAD_SECONDS / 3)
    stop.set()
    for t in threads:
        t.join(timeout=90)
    return results


def test_killing_a_replica_under_load_fails_no_request(two_replicas, reranker):
    handle = serve.get_deployment_handle(model_deployment_name("tiny"), app_name="death")
    ingress = serve.get_deployment_handle("RerankIngress", app_name="death")
    names = _replica_names(handle)
    assert len(names) == 2
    expected = reranker.score(QUERY, DOCS)
    for attempt in range(1, KILL_ATTEMPTS + 1):
        before = ingress.stats.remote().result()["chunk_retries"]
        victim = sorted(names)[0]
        killed_at = time.monotonic() + LOAD_SECONDS / 3  # when _kill_under_load kills
        results = _kill_under_load(two_replicas, victim)
        ok = [r for r in results if not isinstance(r, Exception) and r.status_code == 200]
        retries = ingress.stats.remote().result()["chunk_retries"] - before
        report("replica death", attempt=attempt, sent=len(results), succeeded=len(ok),
               failed=len(results) - len(ok), chunks_retried=retries)
        assert len(ok) == len(results) > CLIENTS
        for r in ok:
            got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
            close([got[i] for i in range(len(DOCS))], expected)
        names = _wait_for_replacement(handle, victim)
        report("replica death", replacement_seconds=round(time.monotonic() - killed_at, 1))
        assert victim not in names and len(names) == 2
        if retries >= 1:  # the kill hit chunks in flight, and the retry saved them
            break
    assert retries >= 1, f"no kill in {KILL_ATTEMPTS} landed on a chunk in flight"
