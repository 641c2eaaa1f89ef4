"""Engine configuration: one frozen object, validated when built."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .prompt import DEFAULT_MAX_LENGTH

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_BATCH_TOKENS = 8192
DEFAULT_MAX_BATCH_PAIRS = 64
# Share of a forward pass that may be padding, by device type. On a CPU a pass of one row is
# already efficient, so padding is nearly pure waste; a GPU pass has a fixed cost that fuller
# batches amortize.
DEFAULT_MAX_PADDING = {"cpu": 0.1, "cuda": 0.5}
# Packed passes (rows concatenated without padding, attention run per row) by device type. On a
# CPU they remove padding and make every matrix product large, which is faster; on a GPU the
# per-row attention calls are small kernels launched one after another, so padded batches with
# one attention call per layer are kept there.
DEFAULT_PACKING = {"cpu": True}


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a checkpoint.

    Attributes:
        device: ``"auto"`` (CUDA if available, else CPU) or a torch device string.
        dtype: ``"auto"`` (bfloat16 on CUDA, float32 elsewhere), ``"float32"``, ``"bfloat16"``
            or ``"float16"``.
        max_length: longest pair sequence in tokens; longer documents are cut at their tail.
        max_batch_tokens: tokens per forward pass (padding included in padded passes).
        max_batch_pairs: pairs per forward pass.
        share_prefix: compute the part shared by a query's documents once (exact up to rounding).
        max_padding: largest share of padding in a padded forward pass, in [0, 1]; ``None``: by
            device (:data:`DEFAULT_MAX_PADDING`, 0.5 for other devices).
        packing: run packed forward passes (no padding; see :mod:`rerank_core.packing`);
            ``None``: by device (:data:`DEFAULT_PACKING`: on for CPU, off elsewhere).
        max_chunks_per_doc: default most windows per document (:mod:`rerank_core.windows`);
            1 scores the tail-truncated document, as the model card does.
        chunk_overlap_tokens: tokens shared by consecutive windows of a document.
    """

    device: str = "auto"
    dtype: str = "auto"
    max_length: int = DEFAULT_MAX_LENGTH
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    max_batch_pairs: int = DEFAULT_MAX_BATCH_PAIRS
    share_prefix: bool = True
    max_padding: float | None = None
    packing: bool | None = None
    max_chunks_per_doc: int = 1
    chunk_overlap_tokens: int = 0

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_length", "max_batch_tokens", "max_batch_pairs", "max_chunks_per_doc"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_padding is not None and not 0.0 <= self.max_padding <= 1.0:
            raise ValueError(f"max_padding must be in [0, 1], got {self.max_padding}")
        if not 0 <= self.chunk_overlap_tokens < self.max_length:
            raise ValueError(f"chunk_overlap_tokens must be in [0, max_length), got {self.chunk_overlap_tokens}")

    def torch_device(self) -> torch.device:
        """The device to run on, with ``"auto"`` resolved."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def padding_share(self, device: torch.device) -> float:
        """:attr:`max_padding`, with ``None`` resolved for the device the model is on."""
        if self.max_padding is not None:
            return self.max_padding
        return DEFAULT_MAX_PADDING.get(device.type, 0.5)

    def packed(self, device: torch.device) -> bool:
        """:attr:`packing`, with ``None`` resolved for the device the model is on."""
        if self.packing is not None:
            return self.packing
        return DEFAULT_PACKING.get(device.type, False)

    def torch_dtype(self) -> torch.dtype:
        """The weights' dtype, with ``"auto"`` resolved for :meth:`torch_device`."""
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return DTYPES[self.dtype]
