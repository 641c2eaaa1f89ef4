"""Engine configuration: one frozen object, validated when built."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cpu import cpu_features
from .invariant import DEFAULT_TILE_ROWS
from .prompt import DEFAULT_MAX_LENGTH

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Quantized dtypes (rerank_core.quantized): the decoder's linear layers in int8 (CPU) or fp8
# (CUDA, compute capability 8.9+), everything else in a float dtype. Never chosen by "auto".
QUANTIZED_DTYPES = ("int8", "fp8")
# The device type each quantized dtype runs on (the full check, e.g. an fp8-capable GPU, is
# rerank_core.quantized.check_device, at load).
QUANTIZED_DEVICE = {"int8": "cpu", "fp8": "cuda"}
DEFAULT_MAX_BATCH_TOKENS = 8192
DEFAULT_MAX_BATCH_PAIRS = 64
# Share of a forward pass that may be padding, by device type. On a CPU a pass of one row is
# already efficient, so padding is nearly pure waste; a GPU pass has a fixed cost that fuller
# batches amortize.
DEFAULT_MAX_PADDING = {"cpu": 0.1, "cuda": 0.5}
# Packed passes (rows concatenated without padding) by device type. On a CPU they remove padding
# and make every matrix product large. On CUDA they run in half precision only, where attention
# is one varlen kernel call per layer (rerank_core.varlen): on an H200, bf16, 1.12x the pairs/s of
# padded passes with under half the memory per call (docs/benchmarks.md, "GPU"); in float32 CUDA
# has no varlen kernel and per-row attention calls would be small kernels launched one by one.
DEFAULT_PACKING = {"cpu": True, "cuda": True}
# Batch-invariant linear layers (rerank_core.invariant) by device type: off everywhere, an option.
# They make every score independent of what shares its forward pass, at a measured cost of about
# 15 % of pairs/s on CPU in bf16 (fixed 256-row tiles multiply slower than one large product) and
# 3.3x on an H200 (docs/benchmarks.md).
DEFAULT_BATCH_INVARIANT: dict[str, bool] = {}
# Compiled decoder layers (rerank_core.compiled) by device type, in bfloat16/float16 and packed
# passes. On CPU in bf16 they fuse the norms, RoPE, SwiGLU and residual adds between the matrix
# products (docs/benchmarks.md); in float32 that work is a small share and the exact mode stays
# eager. On a CPU without native bf16 (rerank_core.cpu) the emulated matrix products dominate a
# bf16 pass and compiling was never measured to pay there: eager unless asked for. CUDA would need
# Triton and is not measured: off.
DEFAULT_COMPILE_LAYERS = {"cpu": True}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX-BF16 or AVX512-BF16), as torch reports it.

    There bf16 matrix products run several times faster than fp32 (about 5x with AMX); elsewhere
    bf16 is emulated and slower than fp32. See :func:`rerank_core.cpu.cpu_features` (which honours
    ``ONEDNN_MAX_CPU_ISA``).
    """
    return cpu_features().native_bf16


# How packed passes run attention: "segments", one SDPA call per row (any device, any dtype);
# "varlen", one variable-length flash-attention call per layer (CUDA, float16/bfloat16 only; see
# rerank_core.varlen). The default is "varlen" where it can run, "segments" elsewhere.
PACKED_ATTENTION = ("segments", "varlen")
# The dtypes torch's varlen attention kernel takes.
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a checkpoint.

    Attributes:
        device: ``"auto"`` (CUDA if available, else CPU) or a torch device string.
        dtype: ``"auto"`` (bfloat16 on CUDA and on CPUs that multiply bf16 natively, see
            :func:`cpu_has_native_bf16`; float32 elsewhere), ``"float32"`` (the exact mode: 1e-5
            to the model card), ``"bfloat16"`` or ``"float16"``; or a quantized dtype
            (:data:`QUANTIZED_DTYPES`, :mod:`rerank_core.quantized`, opt-in only): ``"int8"``
            (CPU) or ``"fp8"`` (CUDA, compute capability 8.9 and up), the decoder's linear
            layers quantized at load and the rest in :meth:`torch_dtype`.
        max_length: longest pair sequence in tokens; longer documents are cut at their tail.
        max_batch_tokens: tokens per forward pass (padding included in padded passes).
        max_batch_pairs: pairs per forward pass.
        share_prefix: compute the part shared by a query's documents once (exact up to rounding).
        max_padding: largest share of padding in a padded forward pass, in [0, 1]; ``None``: by
            device (:data:`DEFAULT_MAX_PADDING`, 0.5 for other devices).
        packing: run packed forward passes (no padding; see :mod:`rerank_core.packing`);
            ``None``: by device and dtype (:data:`DEFAULT_PACKING`: on for CPU, on for CUDA in
            bfloat16/float16, off otherwise).
        batch_invariant: make each score independent of what else shares its forward pass, bit
            for bit (linear layers in fixed row tiles, :mod:`rerank_core.invariant`; needs packed
            passes); ``None``: by device (:data:`DEFAULT_BATCH_INVARIANT`: off everywhere; it
            costs about 15 % of pairs/s on CPU, docs/benchmarks.md).
        tile_rows: rows per matrix product of the batch-invariant linear layers.
        packed_attention: how packed passes run attention, one of :data:`PACKED_ATTENTION`;
            ``None``: ``"varlen"`` on CUDA in float16/bfloat16, ``"segments"`` otherwise. The
            varlen path is checked against padded passes at start-up and replaced by them if
            they disagree (:func:`rerank_core.varlen.self_check`).
        max_chunks_per_doc: default most windows per document (:mod:`rerank_core.windows`);
            1 scores the tail-truncated document, as the model card does.
        chunk_overlap_tokens: tokens shared by consecutive windows of a document.
        reuse_freed_memory: on CPU with glibc, reuse freed activations from layer to layer
            instead of faulting fresh pages in, and return free pages after each call
            (:mod:`rerank_core.memory`; process-wide malloc settings). No effect elsewhere.
        compile_layers: run each decoder layer compiled by ``torch.compile``, attention left
            eager (:mod:`rerank_core.compiled`; needs a C++ compiler on CPU; compiled at
            start-up, eager layers kept if compiling fails; packed passes only); ``None``: by
            device and dtype (:data:`DEFAULT_COMPILE_LAYERS`: on for CPU in bfloat16/float16 where
            the CPU multiplies bf16 natively, off otherwise); refused with dtype int8.
    """

    device: str = "auto"
    dtype: str = "auto"
    max_length: int = DEFAULT_MAX_LENGTH
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    max_batch_pairs: int = DEFAULT_MAX_BATCH_PAIRS
    share_prefix: bool = True
    max_padding: float | None = None
    packing: bool | None = None
    batch_invariant: bool | None = None
    tile_rows: int = DEFAULT_TILE_ROWS
    packed_attention: str | None = None
    max_chunks_per_doc: int = 1
    chunk_overlap_tokens: int = 0
    reuse_freed_memory: bool = True
    compile_layers: bool | None = None

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES and self.dtype not in QUANTIZED_DTYPES:
            known = ", ".join((*DTYPES, *QUANTIZED_DTYPES))
            raise ValueError(f"dtype must be 'auto' or one of {known}, got {self.dtype!r}")
        if self.quantization and self.device != "auto":
            wanted = QUANTIZED_DEVICE[self.dtype]
            if torch.device(self.device).type != wanted:
                other = "fp8" if self.dtype == "int8" else "int8"
                raise ValueError(f"dtype {self.dtype} runs on {wanted} only, not on device {self.device!r} (use {other} there)")
        for name in ("max_length", "max_batch_tokens", "max_batch_pairs", "tile_rows", "max_chunks_per_doc"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_padding is not None and not 0.0 <= self.max_padding <= 1.0:
            raise ValueError(f"max_padding must be in [0, 1], got {self.max_padding}")
        if self.batch_invariant and self.packing is False:
            raise ValueError("batch_invariant needs packed passes (packing=True or None)")
        if self.compile_layers and self.packing is False:
            raise ValueError("compile_layers needs packed passes (packing=True or None); padded passes run eagerly")
        if self.compile_layers and self.dtype == "int8":
            # Inductor lowers oneDNN's int8 product only for frozen weights (the compile fails);
            # the layers' activation quantization is compiled on its own (rerank_core.quantized).
            raise ValueError("compile_layers does not apply to dtype int8: its layers run eagerly, their "
                             "activation quantization compiled on its own")
        if self.packed_attention is not None and self.packed_attention not in PACKED_ATTENTION:
            raise ValueError(
                f"packed_attention must be None or one of {', '.join(PACKED_ATTENTION)}, got {self.packed_attention!r}"
            )
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

    def packed(self, device: torch.device, dtype: torch.dtype | None = None) -> bool:
        """:attr:`packing`, with ``None`` resolved for the model's device and dtype."""
        if self.packing is not None:
            return self.packing
        if device.type == "cuda" and dtype not in HALF_DTYPES:
            return False
        return DEFAULT_PACKING.get(device.type, False)

    def invariant(self, device: torch.device, dtype: torch.dtype | None = None) -> bool:
        """:attr:`batch_invariant`, with ``None`` resolved for the device (and layout) in use."""
        if not self.packed(device, dtype):
            return False
        if self.batch_invariant is not None:
            return self.batch_invariant
        return DEFAULT_BATCH_INVARIANT.get(device.type, False)

    def compiled_layers(self, device: torch.device, dtype: torch.dtype) -> bool:
        """:attr:`compile_layers`, with ``None`` resolved for the model's device and dtype.

        Always False for padded passes (:meth:`packed`), which are never compiled.
        """
        if not self.packed(device, dtype):
            return False
        if self.compile_layers is not None:
            return self.compile_layers
        if self.quantization:
            return False  # never measured compiled; the quantized products are library calls either way
        if device.type == "cpu" and not cpu_has_native_bf16():
            return False
        return dtype in HALF_DTYPES and DEFAULT_COMPILE_LAYERS.get(device.type, False)

    def packed_attention_for(self, device: torch.device, dtype: torch.dtype) -> str:
        """:attr:`packed_attention`, with ``None`` resolved for the model's device and dtype."""
        if self.packed_attention is not None:
            return self.packed_attention
        return "varlen" if device.type == "cuda" and dtype in HALF_DTYPES else "segments"

    @property
    def quantization(self) -> str | None:
        """``"int8"`` or ``"fp8"`` for a quantized :attr:`dtype`, ``None`` for a float one."""
        return self.dtype if self.dtype in QUANTIZED_DTYPES else None

    def torch_dtype(self) -> torch.dtype:
        """The float dtype the model computes in, with ``"auto"`` resolved for :meth:`torch_device`.

        For a quantized :attr:`dtype`, the dtype of everything but the quantized layers: bfloat16
        for fp8 and for int8 on a CPU that multiplies bf16 natively, float32 for int8 elsewhere.
        """
        if self.dtype == "auto" or self.dtype == "int8":
            device = self.torch_device().type
            native = device == "cuda" or (device == "cpu" and cpu_has_native_bf16())
            return torch.bfloat16 if native else torch.float32
        if self.dtype == "fp8":
            return torch.bfloat16
        return DTYPES[self.dtype]

    def load_dtype(self) -> torch.dtype:
        """The dtype to load the checkpoint in: :meth:`torch_dtype`, except bfloat16 (the released
        files' dtype) for a quantized :attr:`dtype`, whose weights are quantized from it."""
        return torch.bfloat16 if self.quantization else self.torch_dtype()
