"""Packed passes run their last decoder layer for the rows a score reads only (rerank_core.kept_rows)."""

from __future__ import annotations

import copy

import pytest
import torch

from rerank_core import EngineConfig, Reranker
from rerank_core.kept_rows import supports
from tests.test_engine import DOCS, LONG_DOC, QUERY

QUERIES = [
    ("q", DOCS[:3], None),
    (QUERY * 5, DOCS[3:] + [LONG_DOC], None),
    ("why?", DOCS[::2], "Find code answers"),
    ("one document", DOCS[1:2], None),  # a single document runs as a whole pair
]


@pytest.mark.parametrize(
    "budget, pairs, share_prefix",
    [
        (8192, 64, True),  # every prefix rides in the one pass of all documents
        (8192, 4, True),  # later passes read prefixes recorded (last layer included) by earlier ones
        (100, 64, True),  # prefixes run in passes of their own, which keep no row at all
        (8192, 64, False),  # whole pairs: segments without a prefix
    ],
)
def test_kept_rows_give_the_full_models_scores(tiny_checkpoint, budget, pairs, share_prefix):
    config = EngineConfig(packing=True, max_batch_tokens=budget, max_batch_pairs=pairs, share_prefix=share_prefix)
    engine = Reranker.load(str(tiny_checkpoint), device="cpu", dtype="float32", config=config)
    assert engine.scorer.kept_rows_only  # the CPU packed default
    encoded = [engine.encode(q, d, i) for q, d, i in QUERIES]
    kept = engine.scorer.score(encoded)
    engine.scorer.kept_rows_only = False
    full = engine.scorer.score(encoded)
    assert kept.stats == full.stats
    for a, b in zip(kept.scores, full.scores):
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6


def test_the_last_layers_mlp_sees_one_row_per_document(tiny_checkpoint):
    engine = Reranker.load(str(tiny_checkpoint), device="cpu", dtype="float32", config=EngineConfig(packing=True))
    layers = engine.scorer.backbone.layers
    rows: dict[str, list[int]] = {"first": [], "last": []}
    hooks = [
        layers[0].mlp.register_forward_hook(lambda m, args, out: rows["first"].append(args[0].shape[-2])),
        layers[-1].mlp.register_forward_hook(lambda m, args, out: rows["last"].append(args[0].shape[-2])),
    ]
    try:
        encoded = engine.encode(QUERY, DOCS)
        engine.scorer.score([encoded])
    finally:
        for hook in hooks:
            hook.remove()
    tokens = len(encoded.shared) + sum(map(len, encoded.documents))
    assert rows == {"first": [tokens], "last": [len(DOCS)]}


def test_supports_only_the_qwen3_layout(reranker):
    assert supports(reranker.scorer.backbone)
    assert not supports(torch.nn.Linear(2, 2))
    # Same module names, another model type (Qwen3-MoE's MLP is a sparse block).
    other = copy.deepcopy(reranker.scorer.backbone)
    other.config.model_type = "qwen3_moe"
    assert not supports(other)
