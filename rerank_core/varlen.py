"""Packed passes for CUDA: one variable-length flash-attention call per layer for the whole pass.

The CPU packed path (:mod:`rerank_core.packing`) runs attention once per segment. On a GPU those
are many small kernels launched one after another; :func:`torch.nn.attention.varlen.varlen_attn`
(torch >= 2.9) runs all of them in one kernel, given the packed queries, a packed key/value
buffer and cumulative lengths. This module builds that call from the same :class:`Segments` the
CPU path uses, so the engine's planning, prefix recording and scoring stay one code path:

* :func:`build_layout` turns the segments of a pass into a :class:`VarlenLayout` (cumulative
  query and key lengths, longest lengths, and where each key of the packed key buffer comes
  from). Position ids and the index of each segment's last token are those of
  :meth:`Segments.positions` and :meth:`Segments.ends`, the same for both paths.
* :func:`varlen_attention`, registered with transformers under :data:`VARLEN_ATTENTION_NAME`,
  runs one kernel call per layer for a pass given as a :class:`VarlenPass`; any other mask goes
  to stock SDPA, so the model behaves as usual outside packed passes.
* :class:`VarlenAttention` is what :class:`~rerank_core.forward.PairScorer` takes to use this
  path. Its kernel is injectable: :func:`reference_varlen_attn` implements the same signature and
  semantics with per-sequence SDPA, so everything but the CUDA kernel itself runs in CPU tests.
* :func:`self_check` compares packed and padded scores on :data:`PROBES`; the engine runs it at
  start-up (:func:`checked_scorer`) and serves padded passes, with a logged reason, when the
  kernel cannot run or disagrees, so a wrong kernel result never reaches a caller.

**Causal alignment.** ``varlen_attn`` is causal when ``window_size == (-1, 0)``. Its flash
kernel aligns the causal mask to the *bottom right* when a sequence has more keys than queries
(``mask.h``: query row ``i`` sees key columns ``j < i + 1 + seqlen_k - seqlen_q``). A document
segment of ``L`` tokens whose keys are its query's ``P`` prefix keys followed by its own ``L``
keys therefore gives token ``i`` exactly the keys ``0 .. P + i``: all of the prefix and its own
tokens up to itself. (SDPA's ``is_causal`` is top-left aligned, which would be wrong here;
:func:`reference_varlen_attn` follows the kernel, and a test pins the difference.)

**Why a gathered key buffer, not the paged form.** ``varlen_attn`` also reads keys through a
block table (``block_table`` with ``seqused_k``), which could point every document of a query at
its prefix's pages without copying them. It cannot express this layout without copies, though:

* a sequence's keys are whole pages, and the kernel requires pages of a multiple of 256 tokens
  (flash-attention's ``mha_varlen_fwd``: "Paged KV cache block size must be divisible by 256");
* a document's own keys must follow its prefix directly (no gap: ``seqused_k`` trims only the
  end of a sequence, never the middle), so they start inside the prefix's last, partial page,
  and that page must be copied per document to hold them;
* a Qwen3-Reranker prefix (system prompt, instruction, query: about 70-120 tokens) usually fits in
  one partial page, so the per-document copy would be the whole prefix anyway, in 256-token
  pages padded with unused slots.

So each layer gathers, once per pass, a packed key buffer in which each segment's keys are its
prefix's keys followed by its own: one indexed copy per prefix store and one for the pass's own
keys, a buffer of ``sum(prefix + own)`` tokens that lives for that layer's call only (the CPU path
copies the same amount, one concatenation per segment). Prefix keys stay stored once per query
between passes. A pass in which no segment has a prefix (a prefix pass, or single-document
queries only) needs no gather: its own keys are the buffer.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .errors import error_summary
from .packing import Segments
from .quantized import compute_dtype

log = logging.getLogger(__name__)

VARLEN_ATTENTION_NAME = "rerank_core_varlen"
# varlen_attn's window for causal attention (bottom-right aligned; see the module docstring).
CAUSAL_WINDOW = (-1, 0)
# Largest |packed - padded| score difference the start-up check accepts. Two correct bf16 paths
# differ by rounding only (2e-3 on the tiny test model, whose bf16 scores are 1.3e-2 from fp32);
# a wrong attention layout moves scores by far more (0.45 on the same model for a top-left
# instead of bottom-right causal mask).
SELF_CHECK_TOLERANCE = 2e-2

# The signature of torch.nn.attention.varlen.varlen_attn.
VarlenKernel = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class KeySource:
    """Keys of one recorded prefix pass that a packed key buffer reads: ``buffer[dst] = store[src]``."""

    store: int
    src: torch.Tensor  # token indices in the store's pass, int64
    dst: torch.Tensor  # positions in the packed key buffer, int64


@dataclass(frozen=True)
class VarlenLayout:
    """One packed pass in the form ``varlen_attn`` takes.

    Segment ``s`` has queries ``cu_seq_q[s]:cu_seq_q[s+1]`` of the packed row and keys
    ``cu_seq_k[s]:cu_seq_k[s+1]`` of the packed key buffer: its prefix's keys (read from the
    recorded stores through :attr:`sources`) followed by its own keys (the pass's keys, placed
    at :attr:`own_dst`). With a causal window (bottom-right aligned) each token then sees its whole
    prefix and its own segment up to itself.

    Attributes:
        cu_seq_q: ``(segments + 1,)`` int32, cumulative query lengths (segment starts in the row).
        cu_seq_k: ``(segments + 1,)`` int32, cumulative key lengths (prefix + own per segment).
        max_q: longest segment.
        max_k: longest key sequence (prefix + own).
        total_k: length of the packed key buffer.
        own_dst: ``(tokens,)`` int64, where each of the pass's own keys goes in the buffer;
            ``None`` when no segment has a prefix (the buffer is then the pass's own keys).
        sources: per prefix store read by this pass, which of its keys go where.
    """

    cu_seq_q: torch.Tensor
    cu_seq_k: torch.Tensor
    max_q: int
    max_k: int
    total_k: int
    own_dst: torch.Tensor | None
    sources: tuple[KeySource, ...]


@dataclass(frozen=True)
class HostLayout:
    """A :class:`VarlenLayout` still on the host: its index arrays, to be copied in one transfer.

    Attributes:
        arrays: int64 arrays, in order: cumulative query lengths, cumulative key lengths, then,
            when a segment has a prefix, the own keys' destinations and a (source, destination)
            pair per store in :attr:`stores`.
        stores: the prefix stores the pass reads, ascending.
        max_q, max_k, total_k: as in :class:`VarlenLayout`.
    """

    arrays: list[np.ndarray]
    stores: tuple[int, ...]
    max_q: int
    max_k: int
    total_k: int

    def on_device(self, tensors: list[torch.Tensor]) -> VarlenLayout:
        """The layout over ``tensors``: :attr:`arrays` as they arrived on the device."""
        pairs = tensors[3:]
        return VarlenLayout(
            cu_seq_q=tensors[0].to(torch.int32),
            cu_seq_k=tensors[1].to(torch.int32),
            max_q=self.max_q,
            max_k=self.max_k,
            total_k=self.total_k,
            own_dst=tensors[2] if self.stores else None,
            sources=tuple(KeySource(store, pairs[2 * i], pairs[2 * i + 1]) for i, store in enumerate(self.stores)),
        )


def host_layout(segments: Segments) -> HostLayout:
    """The host arrays of the :class:`VarlenLayout` of a packed pass over ``segments``.

    Built with array operations, not a loop over tokens: as a Python loop this took about 24 ms of
    host time per call of bench/host.py's 512-pair GPU workload (cProfile, 2-core AMD EPYC).
    """
    lengths = np.asarray(segments.lengths, dtype=np.int64)
    prefix_lengths = segments.prefix_lengths()
    refs = [p for p in segments.prefixes if p is not None]
    cu_q = np.concatenate([[0], np.cumsum(lengths)])
    cu_k = np.concatenate([[0], np.cumsum(lengths + prefix_lengths)])
    key_starts = cu_k[:-1]
    arrays = [cu_q, cu_k]
    stores: list[int] = []
    if refs:
        # A segment's own keys follow its prefix's in the buffer.
        arrays.append(np.arange(int(cu_q[-1]), dtype=np.int64) + np.repeat(key_starts + prefix_lengths - cu_q[:-1], lengths))
        has_prefix = np.asarray([p is not None for p in segments.prefixes], dtype=bool)
        counts = prefix_lengths[has_prefix]
        # Token k of a prefix goes from store position start + k to buffer position key_start + k.
        offsets = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        src = np.repeat(np.asarray([p.start for p in refs], dtype=np.int64), counts) + offsets
        dst = np.repeat(key_starts[has_prefix], counts) + offsets
        store_of = np.repeat(np.asarray([p.store for p in refs], dtype=np.int64), counts)
        for store in sorted(set(p.store for p in refs)):
            chosen = store_of == store
            arrays += [src[chosen], dst[chosen]]
            stores.append(store)
    return HostLayout(
        arrays, tuple(stores), int(lengths.max()), int((lengths + prefix_lengths).max()), int(cu_k[-1])
    )


def build_layout(segments: Segments, device: torch.device | str = "cpu") -> VarlenLayout:
    """The :class:`VarlenLayout` of a packed pass over ``segments``, its tensors on ``device``
    (the engine copies :func:`host_layout`'s arrays with its other pass inputs instead)."""
    host = host_layout(segments)
    return host.on_device([torch.from_numpy(a).to(device) for a in host.arrays])


@dataclass
class VarlenPass:
    """What the model receives as its attention mask for one packed pass on the varlen path."""

    segments: Segments
    layout: VarlenLayout
    kernel: VarlenKernel


def _packed_keys(own: torch.Tensor, kind: int, packed: VarlenPass, layer: int) -> torch.Tensor:
    """The packed key (``kind`` 0) or value (1) buffer ``(total_k, kv_heads, dim)`` of one layer.

    ``own`` is the pass's own keys/values as ``(tokens, kv_heads, dim)``.
    """
    layout = packed.layout
    if layout.own_dst is None:
        return own
    buffer = own.new_empty((layout.total_k, *own.shape[1:]))
    buffer.index_copy_(0, layout.own_dst, own)
    for source in layout.sources:
        stored = packed.segments.stores[source.store][layer][kind]  # (1, kv_heads, tokens, dim)
        buffer.index_copy_(0, source.dst, stored[0].transpose(0, 1).index_select(0, source.src))
    return buffer


# A graph break under torch.compile (rerank_core.compiled), as packed attention is.
@torch.compiler.disable
def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for a packed pass (``attention_mask`` is a :class:`VarlenPass`); SDPA otherwise.

    Shapes follow transformers' attention functions: ``query`` is ``(1, heads, tokens, dim)``,
    ``key``/``value`` ``(1, kv_heads, tokens, dim)``; returns ``((1, tokens, heads, dim), None)``.
    One kernel call for the whole pass. Inference only: ``dropout`` is not applied.
    """
    packed = attention_mask
    if not isinstance(packed, VarlenPass):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if packed.segments.record is not None:
        packed.segments.record.append((key, value))
    layout = packed.layout
    # (tokens, heads, dim) with a contiguous last dimension, as the kernel requires; contiguous
    # throughout so the kernel sees the simplest strides.
    q = query[0].transpose(0, 1).contiguous()
    k = _packed_keys(key[0].transpose(0, 1).contiguous(), 0, packed, module.layer_idx)
    v = _packed_keys(value[0].transpose(0, 1).contiguous(), 1, packed, module.layer_idx)
    return call_kernel(packed.kernel, q, k, v, layout, scaling)[None], None


@functools.lru_cache(maxsize=16)
def _keywords(kernel: VarlenKernel) -> frozenset[str]:
    """The keyword arguments ``kernel`` takes (``varlen_attn`` gained some across torch versions)."""
    return frozenset(inspect.signature(kernel).parameters)


def call_kernel(kernel: VarlenKernel, q, k, v, layout: VarlenLayout, scale: float | None) -> torch.Tensor:
    """``kernel(q, k, v, ...)`` causal, with grouped K/V heads, in the form this torch's takes.

    torch 2.9-2.11's ``varlen_attn`` takes no ``enable_gqa``: K/V heads are then repeated to one
    per query head (what ``enable_gqa`` does inside the kernel, at the cost of a copy). A kernel
    with no ``window_size`` gets ``is_causal=True`` (flash aligns that to the bottom right too;
    the start-up check in :func:`self_check` catches a kernel that does not).
    """
    words = _keywords(kernel)
    kwargs = {"scale": scale} if "scale" in words else {}
    if "window_size" in words:
        kwargs["window_size"] = CAUSAL_WINDOW
    else:
        kwargs["is_causal"] = True
    if "enable_gqa" in words:
        kwargs["enable_gqa"] = True
    elif k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return kernel(q, k, v, layout.cu_seq_q, layout.cu_seq_k, layout.max_q, layout.max_k, **kwargs)


AttentionInterface.register(VARLEN_ATTENTION_NAME, varlen_attention)
# As for the CPU packed function: ordinary calls (padded passes) get the masks SDPA gets.
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_ATTENTION_NAME, sdpa_mask)


def reference_varlen_attn(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_q: torch.Tensor,
    cu_seq_k: torch.Tensor,
    max_q: int,
    max_k: int,
    *,
    return_aux=None,
    scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    enable_gqa: bool = False,
    seqused_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """``varlen_attn``'s semantics with one SDPA call per sequence: a stand-in for any device.

    Sequence ``s`` attends from ``query[cu_seq_q[s]:cu_seq_q[s+1]]`` to
    ``key[cu_seq_k[s]:cu_seq_k[s+1]]``. With ``window_size = (left, right)`` query ``i`` of a
    sequence with ``Lq`` queries and ``Lk`` keys sees keys ``j`` with
    ``i + Lk - Lq - left <= j <= i + Lk - Lq + right`` (a bound of -1 is unbounded), aligned to
    the bottom right as in the flash kernel; ``(-1, 0)`` is causal. Only the unpaged form:
    ``seqused_k``, ``block_table`` and ``return_aux`` are refused.
    """
    if seqused_k is not None or block_table is not None or return_aux is not None:
        raise ValueError("reference_varlen_attn supports neither paged keys nor auxiliary outputs")
    left, right = window_size
    out = query.new_empty(query.shape)
    cq, ck = cu_seq_q.tolist(), cu_seq_k.tolist()
    for s in range(len(cq) - 1):
        q = query[cq[s] : cq[s + 1]].transpose(0, 1)[None]
        k = key[ck[s] : ck[s + 1]].transpose(0, 1)[None]
        v = value[ck[s] : ck[s + 1]].transpose(0, 1)[None]
        lq, lk = q.shape[2], k.shape[2]
        rows = torch.arange(lq, device=query.device)[:, None] + (lk - lq)
        cols = torch.arange(lk, device=query.device)[None, :]
        allowed = torch.ones((lq, lk), dtype=torch.bool, device=query.device)
        if right >= 0:
            allowed &= cols <= rows + right
        if left >= 0:
            allowed &= cols >= rows - left
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=enable_gqa)
        out[cq[s] : cq[s + 1]] = o[0].transpose(0, 1)
    return out


def flash_varlen_attn() -> VarlenKernel:
    """torch's ``varlen_attn`` (torch >= 2.9).

    Raises:
        RuntimeError: this torch has no ``torch.nn.attention.varlen``.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        raise RuntimeError(f"torch {torch.__version__} has no varlen_attn (torch >= 2.9 does)") from e
    return varlen_attn


class VarlenAttention:
    """The varlen packed-attention path for :class:`~rerank_core.forward.PairScorer`.

    Args:
        kernel: a function with ``varlen_attn``'s signature; ``None``: torch's
            (:func:`flash_varlen_attn`, resolved on first use).
    """

    name = VARLEN_ATTENTION_NAME

    def __init__(self, kernel: VarlenKernel | None = None):
        self._kernel = kernel

    @property
    def kernel(self) -> VarlenKernel:
        if self._kernel is None:
            self._kernel = flash_varlen_attn()
        return self._kernel

    def unsupported(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why torch's kernel cannot run on ``device`` in ``dtype``; ``None`` if it can, or for
        an injected kernel (which may run anywhere)."""
        if self._kernel is not None:
            return None
        if device.type != "cuda":
            return f"torch's varlen_attn runs on CUDA only, not on {device.type}"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"torch's varlen_attn takes float16 or bfloat16, not {dtype}"
        return None

    @staticmethod
    def plan(segments: Segments) -> HostLayout:
        """The host side of a packed pass's layout (:func:`host_layout`), for the caller to copy."""
        return host_layout(segments)

    def prepare(self, segments: Segments, layout: VarlenLayout) -> VarlenPass:
        """The attention mask the model gets for a packed pass over ``segments``, given its
        layout on the device (``plan(segments).on_device(...)``)."""
        return VarlenPass(segments, layout, self.kernel)


# Start-up probes: (query, documents). Several queries in one call, so passes hold the documents
# of queries with different prefix lengths side by side; documents of mixed lengths (one word to
# a few hundred tokens); and a single-document query, which runs without a prefix.
_FILLER = "Rivers carry water from mountains to the sea, shaping valleys, deltas and plains. "
PROBES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "What is the capital of France?",
        (
            "Paris is the capital and largest city of France.",
            "Berlin.",
            "The Eiffel Tower was completed in 1889 for the World's Fair held in Paris. " * 6,
            _FILLER * 20,
        ),
    ),
    (
        "How do rivers shape the landscape over thousands of years, and which processes matter most?",
        ("Erosion, transport and deposition of sediment.", _FILLER * 3, "No."),
    ),
    ("Is water wet?", ("Water makes other things wet; whether water itself is wet is a question of definition.",)),
)


def self_check(packed, padded, encode, tolerance: float = SELF_CHECK_TOLERANCE, report: dict | None = None) -> str | None:
    """Score :data:`PROBES` with a packed and a padded scorer; ``None`` when they agree.

    Args:
        packed, padded: :class:`~rerank_core.forward.PairScorer` objects over the same model,
            one with packed passes through a :class:`VarlenAttention` (the path under test),
            one with padded passes.
        encode: ``encode(query, documents)`` -> an encoded query (the engine's encoder).
        tolerance: largest accepted |packed - padded| score difference.
        report: when given, receives ``"max_abs_diff"``: the largest difference found (the check's
            margin is ``tolerance`` minus it), when both paths scored.

    Returns:
        Why the packed path must not be used (torch's kernel cannot run on this device or
        dtype, the pass raised, a score is not finite, or the scores differ by more than
        ``tolerance``), or ``None``.
    """
    reason = packed.packed_attention.unsupported(packed.device, compute_dtype(packed.backbone))
    if reason is not None:
        return reason
    try:
        encoded = [encode(query, list(documents)) for query, documents in PROBES]
        got = packed.score(encoded).scores
    except Exception as e:  # any failure of the packed path means: do not serve with it
        return f"the packed pass raised {error_summary(e)}"
    want = padded.score(encoded).scores
    worst, where = 0.0, None
    for q, (row, expected) in enumerate(zip(got, want)):
        for d, (a, b) in enumerate(zip(row, expected)):
            if not math.isfinite(a):
                return f"the packed pass scored probe {q}/{d} as {a}"
            if abs(a - b) > worst:
                worst, where = abs(a - b), (q, d, a, b)
    if report is not None:
        report["max_abs_diff"] = worst
    if worst > tolerance:
        q, d, a, b = where
        return (
            f"packed and padded scores differ by {worst:.3g} (> {tolerance:g}) on probe "
            f"query {q} document {d}: packed {a:.6f}, padded {b:.6f}"
        )
    return None


def checked_scorer(packed, padded, encode, tolerance: float = SELF_CHECK_TOLERANCE, report: dict | None = None):
    """The scorer to serve with: ``packed`` if :func:`self_check` passes, else ``padded``.

    Logs the outcome; on failure the reason, and the backbone is set back to plain SDPA.
    ``report``: see :func:`self_check`.

    Returns:
        ``(scorer, reason)``: ``reason`` is ``None`` when ``packed`` was kept.
    """
    reason = self_check(packed, padded, encode, tolerance, report)
    if reason is None:
        log.info("packed passes with varlen attention agree with padded passes on %d probes", len(PROBES))
        return packed, None
    log.warning("packed passes with varlen attention disabled, serving padded passes: %s", reason)
    padded.backbone.set_attn_implementation("sdpa")
    return padded, reason
