"""One thread for all of an engine's torch work: ComputeThread, the Serve replica, the batch actor.

A second thread running torch work slows every small CPU op (rerank_core.compute_thread), so the
hosts that are called from threads they do not own load and score on one ComputeThread.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from rerank_core import Reranker
from rerank_core.compute_thread import ComputeThread


def test_calls_run_in_order_on_one_thread_that_is_not_the_callers():
    compute = ComputeThread()
    seen = [compute.call(threading.get_ident) for _ in range(3)]
    seen += asyncio.run(_gather(compute, 3))
    assert set(seen) == {compute.ident}
    assert compute.ident != threading.get_ident()
    compute.close()


async def _gather(compute: ComputeThread, n: int) -> list[int]:
    return list(await asyncio.gather(*(compute.run(threading.get_ident) for _ in range(n))))


def test_errors_reach_the_caller_and_the_thread_survives_them():
    compute = ComputeThread()
    with pytest.raises(ZeroDivisionError):
        compute.call(lambda: 1 / 0)
    with pytest.raises(KeyError):
        asyncio.run(compute.run(dict().__getitem__, "missing"))
    assert compute.call(sum, [1, 2]) == 3
    compute.close()


def test_a_call_from_the_compute_thread_itself_runs_inline():
    compute = ComputeThread()
    assert compute.call(lambda: compute.call(threading.get_ident)) == compute.ident
    compute.close()


def test_the_event_loop_stays_free_while_work_runs():
    compute = ComputeThread()
    release = threading.Event()

    async def main():
        work = asyncio.ensure_future(compute.run(release.wait, 10))
        ticks = 0
        while not work.done():
            ticks += 1
            if ticks == 5:
                release.set()
            await asyncio.sleep(0.01)
        return ticks, await work

    ticks, released = asyncio.run(main())
    assert released is True and ticks >= 5
    compute.close()


class _ThreadLog:
    """Wraps callables so that each call records the thread it ran on."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def wrap(self, name, fn):
        def recorded(*args, **kwargs):
            self.calls.append((name, threading.get_ident()))
            return fn(*args, **kwargs)

        return recorded

    def threads(self) -> set[int]:
        return {ident for _, ident in self.calls}


@pytest.fixture
def thread_log(monkeypatch):
    log = _ThreadLog()
    load = Reranker.load.__func__
    monkeypatch.setattr(Reranker, "load", classmethod(lambda cls, *a, **k: log.wrap("load", load)(cls, *a, **k)))
    return log


def _replica(tiny_checkpoint):
    from deployments.args import ModelArgs
    from deployments.model_replica import ModelReplica

    return ModelReplica.func_or_class(ModelArgs(name="tiny", source=str(tiny_checkpoint), device="cpu", dtype="float32"))


async def _score_batch(replica, chunks):
    """The replica's batch handler itself (``@serve.batch`` needs a running Serve replica)."""
    return await type(replica).score.__wrapped__(replica, chunks)


def test_the_replica_loads_scores_and_probes_on_its_compute_thread(tiny_checkpoint, thread_log, reranker):
    replica = _replica(tiny_checkpoint)
    engine = replica.engine
    engine.scorer.score = thread_log.wrap("score", engine.scorer.score)
    engine.check_health = thread_log.wrap("health", engine.check_health)
    chunk = engine.encode("what is ray?", ["Ray is a framework.", "Bananas are yellow."])

    async def main():
        scores = await asyncio.gather(_score_batch(replica, [chunk]), _score_batch(replica, [chunk, chunk]))
        await replica.check_health()
        return [row for batch in scores for row in batch]

    rows = asyncio.run(main())
    assert [name for name, _ in thread_log.calls][0] == "load"
    assert {name for name, _ in thread_log.calls} == {"load", "score", "health"}
    assert thread_log.threads() == {replica.compute.ident}
    expected = reranker.scorer.score([chunk]).logits[0]
    assert len(rows) == 3 and all(row == pytest.approx(expected, abs=1e-5) for row in rows)


def test_a_busy_replica_is_healthy_until_its_batch_runs_too_long(tiny_checkpoint, monkeypatch):
    import deployments.model_replica as model_replica

    replica = _replica(tiny_checkpoint)
    release = threading.Event()
    score = replica.engine.scorer.score

    def slow_score(chunks):
        release.wait(30)
        return score(chunks)

    replica.engine.scorer.score = slow_score
    probes = []
    replica.engine.check_health = lambda: probes.append(time.monotonic())
    chunk = replica.engine.encode("q", ["d"])

    async def main():
        batch = asyncio.ensure_future(_score_batch(replica, [chunk]))
        while replica._batch_started is None:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(replica.check_health(), 5)  # answers at once: no probe behind the batch
        monkeypatch.setattr(model_replica, "HUNG_BATCH_S", 0.0)
        with pytest.raises(RuntimeError, match="a batch has been running for"):
            await replica.check_health()
        release.set()
        await batch
        monkeypatch.setattr(model_replica, "HUNG_BATCH_S", 600.0)
        await replica.check_health()  # idle again: the engine is probed

    asyncio.run(main())
    assert len(probes) == 1


def test_the_batch_actor_loads_and_scores_on_its_compute_thread(tiny_checkpoint, thread_log):
    import pyarrow as pa

    from rerank_batch.columns import DOCS_COLUMN, SHARED_COLUMN, Shape
    from rerank_batch.options import ModelOptions
    from rerank_batch.stages import Score

    score = Score(ModelOptions(str(tiny_checkpoint), device="cpu", dtype="float32"), Shape.QUERIES, None, 4)
    score.reranker.score_encoded = thread_log.wrap("score", score.reranker.score_encoded)
    encoded = score.reranker.encode("what is ray?", ["Ray is a framework.", "Bananas are yellow."])
    batch = pa.table({SHARED_COLUMN: [encoded.shared], DOCS_COLUMN: [encoded.documents]})
    # Ray Data calls the actor from a thread of its own.
    results = []
    caller = threading.Thread(target=lambda: results.append(score(batch)))
    caller.start()
    caller.join()
    assert [name for name, _ in thread_log.calls] == ["load", "score"]
    assert thread_log.threads() == {score.compute.ident}
    expected = score.reranker.score("what is ray?", ["Ray is a framework.", "Bananas are yellow."])
    assert results[0].column("scores").to_pylist()[0] == pytest.approx(expected, abs=1e-6)
