"""Packed forward passes: many sequences in one unpadded row, attention kept per sequence.

A packed pass concatenates the token ids of several *segments* (a document part, or a whole
query-plus-document sequence) into one row of shape ``(1, total)``. Every linear layer then runs
on exactly the real tokens, as one large matrix product: no padding is computed, and the product
is as large as the token budget allows (on a CPU a large product runs closer to the machine's
matmul peak than several small ones).

Attention must not cross segments. :class:`Segments` is passed to the model in place of the
attention mask; :func:`segment_attention`, registered with transformers under
:data:`ATTENTION_NAME`, runs scaled-dot-product attention once per segment: a segment sees the
keys of its own prefix (fully) and its own keys (causally). Any other mask is handed to the
stock SDPA function unchanged, and masks are built for this implementation as for SDPA, so the
model still works as usual outside packed passes (padding masks included).

The prefix of a segment is read from keys/values recorded by an earlier packed pass over the
shared parts (:attr:`Segments.record`), addressed by layer index, so a prefix is stored once per
query however many documents use it (each segment's attention call joins it to the segment's own
keys, a copy that lives for that call only). A prefix can also ride in the same pass as its
documents, as leading segments of the row (:attr:`Segments.record_tokens`): at every layer its
keys are recorded before attention runs, so the documents of that pass read them at once and
later passes read the recorded copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .cpu import cpu_features

ATTENTION_NAME = "rerank_core_segments"

# Per layer: (keys, values) of one packed pass, each (1, kv_heads, tokens, head_dim).
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PrefixRef:
    """Where a segment's prefix lies: in pass ``store`` of the recorded prefixes, at ``start``."""

    store: int
    start: int
    length: int


@dataclass
class Segments:
    """The layout of one packed row, handed to the model as its attention mask.

    Attributes:
        lengths: length of each segment, in row order; they sum to the row's length.
        prefixes: per segment, its prefix in ``stores``, or ``None`` for a segment that starts
            from nothing (then plain causal attention).
        stores: recorded keys/values of earlier prefix passes, indexed by :attr:`PrefixRef.store`;
            ``record`` itself may be one of them (prefixes that run in this same pass).
        record: when set, each layer appends its keys/values here, before its attention runs.
        record_tokens: how many leading tokens of the row ``record`` keeps (``None``: all of them,
            a pass of prefixes only). A part is copied, so the rest of the pass is not kept alive.
    """

    lengths: list[int]
    prefixes: list[PrefixRef | None]
    stores: list[LayerKV] = field(default_factory=list)
    record: LayerKV | None = None
    record_tokens: int | None = None
    _masks: dict[tuple[int, int, int, torch.dtype, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if len(self.prefixes) != len(self.lengths) or min(self.lengths, default=1) < 1:
            raise ValueError("one prefix (or None) per segment, and every segment at least one token")

    def ends(self) -> list[int]:
        """Index of each segment's last token in the row."""
        return self.end_array().tolist()

    def end_array(self) -> np.ndarray:
        """:meth:`ends` as an int64 array."""
        return np.cumsum(np.asarray(self.lengths, dtype=np.int64)) - 1

    def prefix_lengths(self) -> np.ndarray:
        """Each segment's prefix length (0 without one), int64."""
        return np.asarray([p.length if p is not None else 0 for p in self.prefixes], dtype=np.int64)

    def positions(self) -> list[int]:
        """Position id of every token: each segment continues after its prefix."""
        return self.position_array().tolist()

    def position_array(self) -> np.ndarray:
        """:meth:`positions` as an int64 array, built without a Python loop over tokens."""
        lengths = np.asarray(self.lengths, dtype=np.int64)
        starts = np.cumsum(lengths) - lengths  # each segment's first index in the row
        return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(self.prefix_lengths() - starts, lengths)

    def record_layer(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Append one layer's keys/values ``(1, kv_heads, tokens, dim)`` to :attr:`record`, if set.

        Called by every layer in order, before its attention runs.
        """
        if self.record is None:
            return
        n = self.record_tokens
        if n is None or n == key.shape[2]:
            self.record.append((key, value))
        else:
            self.record.append((key[:, :, :n].clone(), value[:, :, :n].clone()))

    def with_prefix(self, prefix: PrefixRef, layer: int, key: torch.Tensor, value: torch.Tensor, multiple: int = 1):
        """``(key, value)`` of a segment joined after its prefix's recorded ones at ``layer``.

        A copy that lives for one attention call. With ``multiple`` > 1 the key count is rounded
        up to a multiple of it with zero keys and values, which a mask from :meth:`mask` hides
        (see :data:`KEY_BLOCK`).
        """
        prefix_keys, prefix_values = self.stores[prefix.store][layer]
        span = slice(prefix.start, prefix.start + prefix.length)
        used = prefix.length + key.shape[2]
        padding = -(-used // multiple) * multiple - used

        def join(stored: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
            parts = [stored[:, :, span], own]
            if padding:
                # Zeros, not whatever the memory held: a hidden key still enters the products, and
                # a NaN bit pattern there would survive the mask.
                parts.append(own.new_zeros((*own.shape[:2], padding, own.shape[3])))
            return torch.cat(parts, dim=2)

        return join(prefix_keys, key), join(prefix_values, value)

    def mask(
        self, length: int, prefix_length: int, rows: int, dtype: torch.dtype, device: torch.device, keys: int | None = None
    ) -> torch.Tensor:
        """``(rows * length, keys)`` mask: where a query sees a key (all of the prefix, its own
        tokens causally, none of the padding keys past ``prefix_length + length``).

        ``keys`` defaults to ``prefix_length + length`` (no padding). ``dtype`` ``torch.bool``:
        True where it sees. Otherwise additive, of that dtype: 0 where it sees, ``-inf``
        elsewhere (SDPA would turn a boolean mask into this at every call). The ``length`` query
        rows repeat ``rows`` times, for query heads folded into rows (see
        :func:`_prefixed_attention`). Built once per shape and reused by every layer.
        """
        keys = prefix_length + length if keys is None else keys
        cache_key = (length, prefix_length, rows, dtype, keys)
        if cache_key not in self._masks:
            query_index = torch.arange(length, device=device)[:, None]
            key_index = torch.arange(keys, device=device)[None, :]
            hidden = key_index > query_index + prefix_length
            if dtype == torch.bool:
                mask = ~hidden
            else:
                mask = torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))
            self._masks[cache_key] = mask.repeat(rows, 1) if rows > 1 else mask
        return self._masks[cache_key]


# Largest additive mask (elements) :func:`_prefixed_attention` keeps for a pass (8 MB in bf16: a
# folded segment of about 1,000 tokens with 4 query heads per key head). A longer segment runs its
# query heads as heads with a boolean mask (half the memory of a bf16 one, a quarter of an fp32
# one), which SDPA converts at each call.
FOLD_MASK_ELEMENTS = 2**22
# Shortest segment whose query heads are folded. On CPU in bf16, SDPA runs blocks of fewer than 64
# query rows on another path than longer ones, and that path came out closer to float32 on this
# project's checkpoints (mean score difference 0.0035 against 0.0047 when short segments were
# folded too); from 64 tokens on, folded and unfolded blocks take the same path.
FOLD_MIN_TOKENS = 64
# Key counts are rounded up to a multiple of this for CPU attention in bf16. SDPA's CPU kernel
# multiplies bf16 blocks on AMX tiles of 32 values; with a key count that is not a multiple of
# 32 its probabilities-times-values product runs a slow tail path (oneDNN's verbose log: 25-28 us
# for a 64 x 274 x 128 block against 6-10 us for the 64 x 128 x 274 block of scores). One
# segment of 200 tokens after a 74-token prefix: 1.48 ms with 274 keys, 0.68 ms with 288, of
# which 14 are zero keys under the mask (docs/benchmarks.md). A hidden key's probability is
# exactly 0, so the result is the same attention; float32 runs another kernel and is not padded,
# nor are CPUs without AMX, whose bf16 kernel has no such tiles.
KEY_BLOCK = 32


# A graph break under torch.compile (rerank_core.compiled): a Python loop over the pass's layout.
@torch.compiler.disable
def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for a packed row (``attention_mask`` is :class:`Segments`); SDPA otherwise.

    Shapes follow transformers' attention functions: ``query`` is ``(1, heads, tokens, dim)``,
    ``key``/``value`` ``(1, kv_heads, tokens, dim)``; returns ``((1, tokens, heads, dim), None)``.
    Inference only: ``dropout`` is not applied to packed rows.
    """
    segments = attention_mask
    if not isinstance(segments, Segments):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer = module.layer_idx
    segments.record_layer(key, value)
    out = query.new_empty((1, query.shape[2], query.shape[1], query.shape[3]))
    start = 0
    for length, prefix in zip(segments.lengths, segments.prefixes):
        end = start + length
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        if prefix is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            k, v = segments.with_prefix(prefix, layer, k, v, key_multiple(q))
            o = _prefixed_attention(segments, q, k, v, prefix.length, scaling)
        out[:, start:end] = o.transpose(1, 2)
        start = end
    return out, None


def key_multiple(query: torch.Tensor) -> int:
    """What :meth:`Segments.with_prefix` rounds a segment's key count up to for ``query``'s attention:
    :data:`KEY_BLOCK` in bf16 on a CPU with AMX (:mod:`rerank_core.cpu`), 1 elsewhere."""
    if query.device.type == "cpu" and query.dtype == torch.bfloat16 and cpu_features().amx_bf16:
        return KEY_BLOCK
    return 1


def _prefixed_attention(segments: Segments, q, k, v, prefix_length: int, scaling) -> torch.Tensor:
    """One segment's attention over its prefix and itself; ``(1, heads, length, dim)``.

    ``k``/``v`` hold the prefix's keys, then the segment's, then any padding keys
    (:meth:`Segments.with_prefix`), which the mask hides.

    On CPU, with grouped-query attention, the query heads that share a key head are folded into
    rows: ``(1, kv_heads, groups * length, dim)`` against that head's keys. The kernel then runs
    half (or a quarter) as many (head, block) tasks, each with more rows, and reads and packs each
    key head once instead of once per query head: about 10 % less attention time on the 0.6B
    shape, 14 % with 4 query heads per key head (docs/benchmarks.md). Every query row is still
    computed from its own segment only. On this project's CPU (torch 2.13, AMX) bf16 results are
    bit-identical to unfolded ones (segments under :data:`FOLD_MIN_TOKENS` are not folded); in
    fp32 the kernel's blocking follows the number of query rows, so a value can move by a last bit
    (``tests/test_packing.py``).
    """
    heads, length, dim = q.shape[1], q.shape[2], q.shape[3]
    groups = heads // k.shape[1]
    keys = k.shape[2]
    elements = length * keys
    if (
        q.device.type == "cpu"
        and groups > 1
        and length >= FOLD_MIN_TOKENS
        and groups * elements <= FOLD_MASK_ELEMENTS
    ):
        mask = segments.mask(length, prefix_length, groups, q.dtype, q.device, keys)
        folded = q.reshape(1, k.shape[1], groups * length, dim)
        # reshape, not view: a kernel may return its output in another memory layout.
        return F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=scaling).reshape(1, heads, length, dim)
    dtype = q.dtype if elements <= FOLD_MASK_ELEMENTS else torch.bool
    mask = segments.mask(length, prefix_length, 1, dtype, q.device, keys)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)


AttentionInterface.register(ATTENTION_NAME, segment_attention)
# Without this, transformers builds no mask at all for an unknown implementation (a padding mask
# would be silently dropped); with it, ordinary calls get the masks SDPA gets.
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
