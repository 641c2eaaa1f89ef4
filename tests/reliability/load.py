"""Bounded background load and deadline-bound waits for the scaling and redeploy tests.

Every wait here has a deadline, and every client request a timeout, so that a test that goes
wrong fails instead of hanging.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

import requests
from ray import serve

from tests.service_helpers import close

# Deadline for waits that include starting a replica: a fresh replica process (torch, Serve) has
# taken over six minutes to start when the 2-core test machine was heavily loaded; usually 10-30 s.
REPLICA_START_DEADLINE_S = 420


@dataclass
class Outcome:
    """One request: when it started and ended (monotonic seconds), and its status or error."""

    started: float
    ended: float
    status: int | str
    scores: list[float] | None

    @property
    def latency_s(self) -> float:
        return self.ended - self.started


class Load:
    """``clients`` threads, each posting ``body`` to ``url`` in a loop until stopped."""

    def __init__(self, url: str, body: dict, clients: int, timeout_s: float = 60):
        self.url, self.body, self.timeout_s = url, body, timeout_s
        self.outcomes: list[Outcome] = []
        self._clients = [(threading.Thread(target=self._run, args=(e,), daemon=True), e)
                         for e in (threading.Event() for _ in range(clients))]

    def start(self) -> Load:
        for thread, _ in self._clients:
            thread.start()
        return self

    def keep(self, clients: int) -> None:
        """Stop all but ``clients`` of the client threads (their requests in flight finish)."""
        for _, stop in self._clients[clients:]:
            stop.set()

    def stop(self, join_s: float = 90) -> list[Outcome]:
        for _, stop in self._clients:
            stop.set()
        deadline = time.monotonic() + join_s
        for thread, _ in self._clients:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t, _ in self._clients), "a client thread did not finish"
        return list(self.outcomes)

    def wait_for_answers(self, count: int, deadline_s: float = 120) -> None:
        """Wait until ``count`` more requests have been answered than now."""
        target = len(self.outcomes) + count
        wait_until(lambda: len(self.outcomes) >= target, deadline_s, f"{count} more answered requests")

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.outcomes.append(call(self.url, self.body, self.timeout_s))


def call(url: str, body: dict, timeout_s: float = 60) -> Outcome:
    """POST ``body``; a 200's scores come back in document order."""
    started = time.monotonic()
    try:
        r = requests.post(url, json=body, timeout=timeout_s)
    except requests.RequestException as e:  # a reset or a hang counts as a failure
        return Outcome(started, time.monotonic(), type(e).__name__, None)
    scores = None
    if r.status_code == 200:
        by_index = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        scores = [by_index[i] for i in range(len(by_index))]
    return Outcome(started, time.monotonic(), r.status_code, scores)


def assert_all_correct(outcomes: list[Outcome], expected: list[float]) -> None:
    """Every request answered 200 with the engine's scores."""
    failed = [o.status for o in outcomes if o.status != 200]
    assert outcomes and not failed, f"{len(failed)} of {len(outcomes)} requests failed: {failed[:10]}"
    for o in outcomes:
        close(o.scores, expected)


def p50_ms(outcomes: list[Outcome]) -> float:
    return round(1000 * statistics.median(o.latency_s for o in outcomes), 1)


def wait_until(predicate, deadline_s: float, what: str, describe=None, period_s: float = 0.25):
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``deadline_s``
    with ``what`` and, if given, ``describe()`` (the state that was reached instead)."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not reached within {deadline_s} s: {what}"
                                 + (f"; last state: {describe()}" if describe else ""))
        time.sleep(period_s)


def _overview(app: str, deployment: str):
    application = serve.status().applications.get(app)
    return application.deployments.get(deployment) if application else None


def replica_states(app: str, deployment: str) -> dict[str, int]:
    """Serve's replica count per state (RUNNING, STARTING, STOPPING, ...), zeros left out; empty
    while the application is still being built."""
    overview = _overview(app, deployment)
    if overview is None:
        return {}
    return {getattr(state, "value", state): n for state, n in overview.replica_states.items() if n}


def deployment_status(app: str, deployment: str) -> str | None:
    """HEALTHY, UPSCALING, ... as Serve reports it; None while the application is being built."""
    overview = _overview(app, deployment)
    return None if overview is None else getattr(overview.status, "value", overview.status)


def replica_actor_names(app: str, deployment: str) -> set[str]:
    """Actor names of the deployment's replicas in any state, from the Serve controller."""
    from ray.serve.context import _get_global_client  # what `serve status` and the dashboard read

    details = _get_global_client().get_serve_details()
    replicas = details["applications"][app]["deployments"][deployment]["replicas"]
    return {r["actor_name"] for r in replicas}
