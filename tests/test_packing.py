"""Packed attention (rerank_core.packing): a segment's attention over its prefix and itself."""

import pytest
import torch
import torch.nn.functional as F

from rerank_core import packing
from rerank_core.cpu import cpu_features, force_cpu_features
from rerank_core.packing import PrefixRef, Segments, _prefixed_attention
from tests.cpu_kinds import CPU_KINDS


def _reference(q, k, v, prefix_length):
    """Stock SDPA with a boolean mask and grouped-query heads, as before folding."""
    length = q.shape[2]
    rows = torch.arange(length)[:, None]
    cols = torch.arange(prefix_length + length)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=cols <= rows + prefix_length, enable_gqa=True)


def _inputs(dtype, heads, kv_heads, length, prefix_length=74):
    torch.manual_seed(0)
    # Laid out as the model produces them: (1, tokens, heads, dim) seen as (1, heads, tokens, dim).
    q = torch.randn(1, length, heads, 128, dtype=dtype).transpose(1, 2)
    k = torch.randn(1, prefix_length + length, kv_heads, 128, dtype=dtype).transpose(1, 2)
    v = torch.randn(1, prefix_length + length, kv_heads, 128, dtype=dtype).transpose(1, 2)
    return q, k, v, Segments([length], [PrefixRef(0, 0, prefix_length)]), prefix_length


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 4e-3), (torch.float32, 1e-6)])
@pytest.mark.parametrize("heads,kv_heads", [(16, 8), (32, 8), (4, 4)])
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("length", [20, 45, 100, 300])
def test_prefixed_attention_matches_grouped_sdpa(monkeypatch, dtype, tolerance, heads, kv_heads, fold, length):
    if not fold:
        monkeypatch.setattr(packing, "FOLD_MASK_ELEMENTS", 0)
    q, k, v, segments, prefix_length = _inputs(dtype, heads, kv_heads, length)
    out = _prefixed_attention(segments, q, k, v, prefix_length, None)
    assert out.shape == (1, heads, length, 128)
    assert (out.float() - _reference(q, k, v, prefix_length).float()).abs().max().item() <= tolerance
    # Which mask was built tells whether the segment was folded (a mask with a row per folded head).
    groups = heads // kv_heads
    folded = fold and groups > 1 and length >= packing.FOLD_MIN_TOKENS
    # With the limit at 0 no additive mask is kept: the boolean one, as stock SDPA takes it.
    keys = prefix_length + length
    assert list(segments._masks) == [(length, prefix_length, groups if folded else 1, dtype if fold else torch.bool, keys)]


def test_long_segments_keep_a_boolean_mask(monkeypatch):
    """Past the additive-mask limit a segment is neither folded nor given an additive mask."""
    monkeypatch.setattr(packing, "FOLD_MASK_ELEMENTS", 1000)
    q, k, v, segments, prefix_length = _inputs(torch.bfloat16, 16, 8, 100)
    out = _prefixed_attention(segments, q, k, v, prefix_length, None)
    assert list(segments._masks) == [(100, prefix_length, 1, torch.bool, prefix_length + 100)]
    assert torch.equal(out, _reference(q, k, v, prefix_length))


@pytest.mark.parametrize("heads,kv_heads", [(16, 8), (32, 8)])
@pytest.mark.parametrize("length", [20, 45, 63, 64, 100, 300])
def test_bf16_attention_is_bit_identical_to_unfolded(heads, kv_heads, length):
    """Short segments are not folded, longer ones take the kernel's same path folded or not
    (on AMX Xeons and on AVX2-only EPYCs alike, torch 2.13)."""
    q, k, v, segments, prefix_length = _inputs(torch.bfloat16, heads, kv_heads, length)
    assert torch.equal(_prefixed_attention(segments, q, k, v, prefix_length, None), _reference(q, k, v, prefix_length))


def test_segment_masks_are_built_once_per_shape():
    segments = Segments([3], [PrefixRef(0, 0, 2)])
    mask = segments.mask(3, 2, 2, torch.bfloat16, torch.device("cpu"))
    assert segments.mask(3, 2, 2, torch.bfloat16, torch.device("cpu")) is mask
    # Rows repeat per folded head; each row sees the prefix and its own tokens up to itself.
    seen = (mask == 0).int().tolist()
    block = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert seen == block + block
    assert mask.dtype == torch.bfloat16 and mask.float().min().item() == float("-inf")


def test_segment_masks_hide_padding_keys():
    segments = Segments([2], [PrefixRef(0, 0, 1)])
    mask = segments.mask(2, 1, 1, torch.bool, torch.device("cpu"), keys=5)
    assert mask.tolist() == [[True, True, False, False, False], [True, True, True, False, False]]


def _stored(dtype, kv_heads, length, prefix_length=74):
    """A segment's own keys/values and a Segments whose store 0, layer 0, holds its prefix's."""
    q, k, v, _, _ = _inputs(dtype, 16, kv_heads, length, prefix_length)
    store = [(k[:, :, :prefix_length], v[:, :, :prefix_length])]
    segments = Segments([length], [PrefixRef(0, 0, prefix_length)], [store])
    return q, k, v, segments


@pytest.mark.parametrize("length, padded", [(20, 96), (22, 96), (150, 224), (300, 384)])
def test_with_prefix_pads_keys_with_zeros_to_a_multiple(length, padded):
    q, k, v, segments = _stored(torch.bfloat16, 8, length)
    keys, values = segments.with_prefix(segments.prefixes[0], 0, k[:, :, 74:], v[:, :, 74:], 32)
    assert keys.shape == values.shape == (1, 8, padded, 128)
    used = 74 + length
    assert torch.equal(keys[:, :, :used], k) and torch.equal(values[:, :, :used], v)
    assert not keys[:, :, used:].any() and not values[:, :, used:].any()
    unpadded = segments.with_prefix(segments.prefixes[0], 0, k[:, :, 74:], v[:, :, 74:])
    assert torch.equal(unpadded[0], k) and torch.equal(unpadded[1], v)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 4e-3), (torch.float32, 1e-6)])
@pytest.mark.parametrize("fold_limit", [packing.FOLD_MASK_ELEMENTS, 0, 1000])
@pytest.mark.parametrize("length", [20, 100, 300])
def test_padded_keys_give_the_same_attention(monkeypatch, dtype, tolerance, fold_limit, length):
    """Zero keys past a segment's own, hidden by the mask, leave its attention as it was
    (folded, unfolded with an additive mask, and past the limit with a boolean one)."""
    monkeypatch.setattr(packing, "FOLD_MASK_ELEMENTS", fold_limit)
    q, k, v, segments = _stored(dtype, 8, length)
    keys, values = segments.with_prefix(segments.prefixes[0], 0, k[:, :, 74:], v[:, :, 74:], 32)
    assert keys.shape[2] % 32 == 0 and keys.shape[2] > 74 + length
    out = _prefixed_attention(segments, q, keys, values, 74, None)
    assert (out.float() - _reference(q, k, v, 74).float()).abs().max().item() <= tolerance
    assert all(key[-1] == keys.shape[2] for key in segments._masks)


@pytest.mark.parametrize("kind", list(CPU_KINDS))
def test_keys_are_padded_for_bf16_on_cpus_with_amx_only(kind):
    """The padding avoids a tail path of SDPA's AMX kernel; other CPUs have no AMX tiles."""
    with force_cpu_features(CPU_KINDS[kind]):
        expected = packing.KEY_BLOCK if kind == "AMX" else 1
        assert packing.key_multiple(torch.zeros(1, dtype=torch.bfloat16)) == expected
        assert packing.key_multiple(torch.zeros(1, dtype=torch.float32)) == 1
    assert packing.KEY_BLOCK == 32
    # This CPU, as torch reports it (a ceiling such as scripts/test-cpu-kind's can take AMX away).
    native = packing.key_multiple(torch.zeros(1, dtype=torch.bfloat16))
    amx = torch.cpu.get_capabilities()["amx_bf16"]
    if cpu_features().ceiling is None:
        assert native == (32 if amx else 1)
    else:
        assert native in ((32, 1) if amx else (1,))


@pytest.mark.parametrize(
    "kind, dtype, multiple, tolerance",
    [("AMX", torch.bfloat16, 32, 4e-3), ("AVX2", torch.bfloat16, 1, 4e-3), ("AMX", torch.float32, 1, 1e-6)],
)
def test_segment_attention_pads_bf16_keys_per_segment(kind, dtype, multiple, tolerance):
    """Through the registered attention function: each segment of a packed row (two queries'
    prefixes, segments of several lengths) gets keys padded for its dtype and CPU kind (padded
    keys run on any CPU: only the choice is the kind's), and the same attention as stock SDPA
    over its own prefix and itself."""
    torch.manual_seed(0)
    lengths = [20, 70, 33]
    stores = [[(torch.randn(1, 4, 124, 128, dtype=dtype), torch.randn(1, 4, 124, 128, dtype=dtype))]]
    prefixes = [PrefixRef(0, 0, 74), PrefixRef(0, 0, 74), PrefixRef(0, 74, 50)]
    segments = Segments(lengths, prefixes, stores)
    tokens = sum(lengths)
    query = torch.randn(1, tokens, 8, 128, dtype=dtype).transpose(1, 2)
    key, value = (torch.randn(1, tokens, 4, 128, dtype=dtype).transpose(1, 2) for _ in range(2))
    module = torch.nn.Module()
    module.layer_idx = 0
    with force_cpu_features(CPU_KINDS[kind]):
        out, _ = packing.segment_attention(module, query, key, value, segments)
    start = 0
    for length, prefix in zip(lengths, prefixes):
        end = start + length
        span = slice(prefix.start, prefix.start + prefix.length)
        k = torch.cat([stores[0][0][0][:, :, span], key[:, :, start:end]], dim=2)
        v = torch.cat([stores[0][0][1][:, :, span], value[:, :, start:end]], dim=2)
        want = _reference(query[:, :, start:end], k, v, prefix.length).transpose(1, 2)
        assert (out[:, start:end].float() - want.float()).abs().max().item() <= tolerance
        start = end
    used = {(length, prefix.length) for length, prefix in zip(lengths, prefixes)}
    keys = {(cached[0], cached[1]): cached[4] for cached in segments._masks}
    assert set(keys) == used
    assert all(count == -(-(length + prefix) // multiple) * multiple for (length, prefix), count in keys.items())
