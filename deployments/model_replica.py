"""The model replica deployment: holds one engine and batches chunks across requests.

Each call to :meth:`ModelReplica.score` is one *chunk*: one query's shared ids and some of its
documents (a :class:`~rerank_core.prompt.EncodedQuery`). ``@serve.batch`` gathers the chunks in
flight on this replica, from any number of requests, and the engine scores them together.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import ray
from ray import serve

from rerank_core import EncodedQuery, Reranker
from rerank_core.compute_thread import ComputeThread

from .args import BatchingArgs, ModelArgs
from .metrics import ReplicaMetrics

logger = logging.getLogger("ray.serve")

# A batch still running after this long fails the health check (a hung device or kernel); until
# then a busy replica is healthy without probing, since a probe would wait behind the batch.
HUNG_BATCH_S = 600.0


def count_pairs(chunks: list) -> int:
    """Batch size of a list of chunks, in document pairs.

    Total by design: an exception here would stop the replica's batching loop for good.
    """
    total = 0
    for chunk in chunks:
        total += len(getattr(chunk, "documents", ()) or ()) or 1
    return total


@dataclasses.dataclass
class ReplicaStats:
    """Counters since start, for ``stats()`` (tests and debugging; metrics carry the same)."""

    batches: int = 0
    chunks: int = 0
    pairs: int = 0
    forward_passes: int = 0
    tokens: int = 0  # real tokens run through the model: with forward_passes, how full passes are
    max_chunks_in_batch: int = 0


@serve.deployment(max_ongoing_requests=128, health_check_period_s=10, health_check_timeout_s=60)
class ModelReplica:
    """One replica of one model. Constructed by Serve from :class:`~deployments.args.ModelArgs`."""

    def __init__(self, model: ModelArgs, min_batch_size: int = 1):
        self.name = model.name
        self.min_batch_size = min_batch_size
        config = model.engine_config()
        # Loading, forward passes and health probes all run on this one thread: a second thread
        # running torch work makes every small CPU op slower (rerank_core.compute_thread).
        self.compute = ComputeThread()
        self.engine = self.compute.call(
            Reranker.load, model.source, hub=model.hub, cache_dir=model.cache_dir, config=config
        )
        self._batch_started: float | None = None
        self.metrics = ReplicaMetrics(model.name)
        self.stats_ = ReplicaStats()
        logger.info("model %s loaded from %s on %s", model.name, model.source, self.engine.device)

    def reconfigure(self, user_config: dict) -> None:
        """Apply :class:`~deployments.args.BatchingArgs` without restarting the replica."""
        batching = BatchingArgs(**user_config)
        if batching.max_batch_size < self.min_batch_size:
            raise ValueError(
                f"max_batch_size {batching.max_batch_size} is below the ingress chunk size "
                f"{self.min_batch_size}; chunks would fail"
            )
        self.score.set_max_batch_size(batching.max_batch_size)
        self.score.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self.batching = batching

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, batch_size_fn=count_pairs)
    async def score(self, chunks: list[EncodedQuery]) -> list[list[float]]:
        """``logit_yes - logit_no`` of each chunk's rows, in order. Call positionally with one chunk.

        Logits, not probabilities: the ingress keeps a long document's best window and answers
        raw scores where asked; it applies the sigmoid itself.
        """
        # Off the event loop, where it would stall every other call to this replica.
        self._batch_started = time.monotonic()
        try:
            result = await self.compute.run(self.engine.scorer.score, chunks)
        finally:
            self._batch_started = None
        self._record(len(chunks), result.stats)
        return result.logits

    def _record(self, num_chunks: int, stats) -> None:
        s = self.stats_
        s.batches += 1
        s.chunks += num_chunks
        s.pairs += stats.pairs
        s.forward_passes += stats.forward_passes
        s.tokens += stats.tokens
        s.max_chunks_in_batch = max(s.max_chunks_in_batch, num_chunks)
        m = self.metrics
        m.chunks.inc(num_chunks)
        m.pairs.inc(stats.pairs)
        m.tokens.inc(stats.tokens)
        m.passes.inc(stats.forward_passes)
        if stats.padded_tokens:
            budget = stats.forward_passes * self.engine.config.max_batch_tokens
            m.batch_fill.observe(min(1.0, stats.padded_tokens / budget))
            m.padding.observe(1.0 - stats.tokens / stats.padded_tokens)

    def stats(self) -> dict:
        """Counters since start: batches, chunks, pairs, forward passes, tokens, largest batch in chunks."""
        return dataclasses.asdict(self.stats_)

    def settings(self) -> dict:
        """The settings this replica runs with now: its actor name, the ``@serve.batch`` settings
        of the last ``reconfigure`` (its ``user_config``) and the engine's per-pass token budget."""
        return {
            "actor_name": self.actor_name(),
            **self.batching.model_dump(),
            "max_batch_tokens": self.engine.config.max_batch_tokens,
        }

    def actor_name(self) -> str:
        """This replica's Ray actor name (``SERVE_REPLICA::app#deployment#id``), to find it in tests."""
        return ray.get_runtime_context().get_actor_name()

    def ping(self) -> str:
        """Liveness for the ingress's ``/health``: answers without touching the model."""
        return self.name

    async def check_health(self) -> None:
        """Serve's health check.

        Idle, the engine re-scores a fixed pair on the compute thread. During a batch the replica
        counts as healthy (it is working, and a probe would wait behind the batch) unless the batch
        has run for over :data:`HUNG_BATCH_S`.
        """
        started = self._batch_started
        if started is None:
            # Nothing awaits between the test and the submission: no batch can get in between.
            await self.compute.run(self.engine.check_health)
        elif time.monotonic() - started > HUNG_BATCH_S:
            raise RuntimeError(f"a batch has been running for {time.monotonic() - started:.0f} s")
