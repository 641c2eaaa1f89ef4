"""A packed pass whose last decoder layer runs only for the rows a score reads.

A score reads one final hidden state per document: its last token's. The last decoder layer's
keys and values are needed for every token (that last token attends to all of them), but its
queries, attention output, output projection and MLP only for the rows that are read. In a
packed pass of 16 documents that is 16 rows instead of about 3,000: of the last layer's weights
only ``k_proj`` and ``v_proj`` still multiply every token (on the 0.6B model 2 of its 15.7 million
per-layer weights), and its attention is one query row per document. That saves most of one
layer in 28 (the 0.6B model): about 2 % of a bf16 call on CPU (docs/benchmarks.md).

:func:`forward_kept_rows` runs the backbone's embedding and every layer but the last as
transformers does, then :func:`_last_layer_rows`, which computes the same operations as
``Qwen3DecoderLayer.forward`` (RMSNorm, projections, per-head q/k RMSNorm, RoPE, attention, output
projection, residual adds, SwiGLU MLP) with its own modules, on the kept rows only. The values are
those of the full layer up to rounding: each operation is per token except the products, whose
blocking depends on their number of rows (as between passes of different sizes).

Only passes whose attention runs through :func:`rerank_core.packing.segment_attention` (the CPU
packed path) use it; :func:`supports` checks that the model has the Qwen3 layer layout.
"""

from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F
from transformers.models.qwen3.modeling_qwen3 import rotate_half

from .compiled import compiled_layer
from .packing import Segments

_ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
_LAYER_MODULES = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


def supports(backbone: torch.nn.Module) -> bool:
    """Whether ``backbone`` is a Qwen3 decoder with the layout :func:`forward_kept_rows` relies on.

    Checked by model type, not only by module names: a Qwen3-MoE layer has the same names, but its
    MLP is a sparse block that this module does not call as it expects.
    """
    if getattr(getattr(backbone, "config", None), "model_type", None) != "qwen3":
        return False
    layers = getattr(backbone, "layers", None)
    if not layers or not all(hasattr(backbone, name) for name in ("embed_tokens", "rotary_emb", "norm")):
        return False
    last = layers[-1]
    return all(hasattr(last, name) for name in _LAYER_MODULES) and all(
        hasattr(last.self_attn, name) for name in _ATTENTION_MODULES
    )


def forward_kept_rows(
    backbone: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    segments: Segments,
    keep: list[int],
) -> torch.Tensor:
    """Final (normed) hidden states ``(len(keep), hidden)`` of rows ``keep`` of one packed row.

    ``input_ids`` and ``position_ids`` are ``(1, tokens)``; ``segments`` is the row's layout, and
    every layer records its keys and values into ``segments.record`` as in a full pass.
    """
    hidden = backbone.embed_tokens(input_ids)
    position_embeddings = backbone.rotary_emb(hidden, position_ids)
    layers = backbone.layers[: backbone.config.num_hidden_layers]
    for layer in layers[:-1]:
        hidden = layer(
            hidden,
            attention_mask=segments,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            use_cache=False,
        )
    hidden = _last_layer_rows(layers[-1], hidden[0], segments, position_embeddings, keep)
    return backbone.norm(hidden)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers' ``apply_rotary_pos_emb`` applies it, for one of queries or keys."""
    return x * cos + rotate_half(x) * sin


def _last_layer_rows(layer, hidden: torch.Tensor, segments: Segments, position_embeddings, keep: list[int]):
    """The decoder layer ``layer`` on ``hidden`` ``(tokens, hidden)``, output for rows ``keep`` only."""
    # Compiled like the other layers when they are (rerank_core.compiled): the same fused rounding.
    # The steps are shared by the process, like the layers' compiled forward: a model of another
    # shape or dtype in the same process compiles them again.
    if not keep and segments.record is None:
        return hidden[:0]
    steps = _COMPILED if compiled_layer(layer) else _EAGER
    cos, sin = (t[0].unsqueeze(1) for t in position_embeddings)  # (tokens, 1, head_dim)
    x, key, value = steps["keys_values"](layer, hidden, cos, sin)
    segments.record_layer(key, value)
    if not keep:
        return hidden[:0]
    # A single row runs twice: compiled code is specialized for size-1 dimensions, and a graph of
    # its own could round differently from the one every larger count uses (a document's score
    # would then depend on whether it came alone, tests/test_invariance.py).
    padded = keep if len(keep) > 1 else keep * 2
    rows = torch.tensor(padded, device=hidden.device)
    query = steps["queries"](layer, x[rows], cos[rows], sin[rows])
    out = _kept_attention(segments, layer.self_attn.layer_idx, query, key, value, padded, layer.self_attn.scaling)
    return steps["finish"](layer, hidden[rows], out)[: len(keep)]


def _keys_values(layer, hidden, cos, sin):
    """The normed input of every row, and the layer's keys/values ``(1, kv_heads, tokens, head_dim)``."""
    attn = layer.self_attn
    tokens, head_dim = hidden.shape[0], attn.head_dim
    x = layer.input_layernorm(hidden)
    key = _rope(attn.k_norm(attn.k_proj(x).view(tokens, -1, head_dim)), cos, sin).transpose(0, 1)[None]
    value = attn.v_proj(x).view(tokens, -1, head_dim).transpose(0, 1)[None]
    return x, key, value


def _queries(layer, x, cos, sin):
    """Queries ``(rows, heads, head_dim)`` of normed inputs ``x`` ``(rows, hidden)``."""
    attn = layer.self_attn
    return _rope(attn.q_norm(attn.q_proj(x).view(x.shape[0], -1, attn.head_dim)), cos, sin)


def _finish(layer, hidden, attention):
    """Output projection, residual, MLP and residual for rows ``hidden`` given their attention output."""
    residual = hidden + layer.self_attn.o_proj(attention.reshape(hidden.shape[0], -1))
    return residual + layer.mlp(layer.post_attention_layernorm(residual))


_EAGER = {"keys_values": _keys_values, "queries": _queries, "finish": _finish}
# Compiled lazily, on first use (dynamic shapes: one graph for any number of tokens or rows).
_COMPILED = {name: torch.compile(step, dynamic=True) for name, step in _EAGER.items()}


def _kept_attention(segments: Segments, layer: int, query, key, value, keep: list[int], scaling) -> torch.Tensor:
    """Attention of each kept row over its segment's prefix and its segment up to itself.

    ``query`` is ``(rows, heads, head_dim)``; ``key``/``value`` ``(1, kv_heads, tokens, head_dim)``.
    One query row sees every key it is given, so no mask is needed.
    """
    starts = [end - length + 1 for end, length in zip(segments.ends(), segments.lengths)]
    out = torch.empty_like(query)
    for i, row in enumerate(keep):
        segment = bisect.bisect_right(starts, row) - 1
        k, v = key[:, :, starts[segment] : row + 1], value[:, :, starts[segment] : row + 1]
        prefix = segments.prefixes[segment]
        if prefix is not None:
            k, v = segments.with_prefix(prefix, layer, k, v)
        q = query[i][None, :, None]  # (1, heads, 1, head_dim)
        out[i] = F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=True)[0, :, 0]
    return out
