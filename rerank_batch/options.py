"""The settings of a batch run: the model and how scoring actors are placed (no Ray, no torch).

Plain frozen dataclasses: they are checked when built and pickled to the workers as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMATS = ("jsonl", "parquet")
DEFAULT_BATCH_SIZE = 64  # input rows per tokenize and score call


@dataclass(frozen=True)
class ModelOptions:
    """What each stage needs to load its part of the model (all plain values: they are pickled).

    Attributes:
        source: an absolute checkpoint directory, or a registry name or hub id that each worker
            resolves itself (from its download cache, e.g. a volume shared by the nodes).
        hub, cache_dir: see :func:`rerank_core.registry.resolve_source`.
        device, dtype, max_length, max_batch_tokens, max_batch_pairs: engine settings
            (:class:`rerank_core.EngineConfig`); ``None`` keeps its default.
    """

    source: str
    hub: str | None = None
    cache_dir: str | None = None
    device: str | None = None
    dtype: str | None = None
    max_length: int | None = None
    max_batch_tokens: int | None = None
    max_batch_pairs: int | None = None


@dataclass(frozen=True)
class Workers:
    """How the scoring actors are placed.

    Attributes:
        concurrency: number of scoring actors (engines), e.g. one per GPU.
        num_cpus: CPUs each scoring actor reserves (a CPU engine uses that many torch threads).
        num_gpus: GPUs each scoring actor reserves; ``None``: 1 when the model runs on CUDA
            (``device`` ``cuda...``, or ``auto`` and the cluster has GPUs), else 0.
        tokenize_cpus: CPUs each tokenize task reserves.
        batch_size: input rows per tokenize and score call.
    """

    concurrency: int = 1
    num_cpus: float = 1.0
    num_gpus: float | None = None
    tokenize_cpus: float = 1.0
    batch_size: int = DEFAULT_BATCH_SIZE

    def __post_init__(self):
        if self.concurrency < 1 or self.batch_size < 1:
            raise ValueError(f"concurrency and batch_size must be >= 1, got {self.concurrency}, {self.batch_size}")
        for name in ("num_cpus", "num_gpus", "tokenize_cpus"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
