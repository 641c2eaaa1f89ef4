"""Packed attention (rerank_core.packing): a segment's attention over its prefix and itself."""

import pytest
import torch
import torch.nn.functional as F

from rerank_core import packing
from rerank_core.packing import PrefixRef, Segments, _prefixed_attention


def _reference(q, k, v, prefix_length):
    """Stock SDPA with a boolean mask and grouped-query heads, as before folding."""
    length = q.shape[2]
    rows = torch.arange(length)[:, None]
    cols = torch.arange(prefix_length + length)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=cols <= rows + prefix_length, enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads", [(16, 8), (32, 8), (4, 4)])
@pytest.mark.parametrize("fold", [True, False])
def test_prefixed_attention_is_bit_identical_to_grouped_sdpa(monkeypatch, dtype, heads, kv_heads, fold):
    if not fold:
        monkeypatch.setattr(packing, "FOLD_MASK_ELEMENTS", 0)
    torch.manual_seed(0)
    prefix_length, length = 21, 37
    # Laid out as the model produces them: (1, tokens, heads, dim) seen as (1, heads, tokens, dim).
    q = torch.randn(1, length, heads, 64, dtype=dtype).transpose(1, 2)
    k = torch.randn(1, prefix_length + length, kv_heads, 64, dtype=dtype).transpose(1, 2)
    v = torch.randn(1, prefix_length + length, kv_heads, 64, dtype=dtype).transpose(1, 2)
    segments = Segments([length], [PrefixRef(0, 0, prefix_length)])
    out = _prefixed_attention(segments, q, k, v, prefix_length, None)
    assert out.shape == (1, heads, length, 64)
    assert torch.equal(out, _reference(q, k, v, prefix_length))


def test_segment_masks_are_built_once_per_shape():
    segments = Segments([3], [PrefixRef(0, 0, 2)])
    mask = segments.mask(3, 2, 2, torch.bfloat16, torch.device("cpu"))
    assert segments.mask(3, 2, 2, torch.bfloat16, torch.device("cpu")) is mask
    # Rows repeat per folded head; each row sees the prefix and its own tokens up to itself.
    seen = (mask == 0).int().tolist()
    block = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert seen == block + block
    assert mask.dtype == torch.bfloat16 and mask.float().min().item() == float("-inf")
