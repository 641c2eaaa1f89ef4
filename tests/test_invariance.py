"""Batch invariance: a document's score is bit-identical whatever else shares its forward pass."""

from __future__ import annotations

import random

import pytest
import torch

from rerank_core import EngineConfig, Reranker
from rerank_core.forward import PairScorer
from rerank_core.invariant import TiledLinear, tile_linear_layers, tiled, untile_linear_layers
from tests.test_compiled import HAS_COMPILER

WORDS = "the of and to in is was for on that with as by at from river city music law cell energy".split()
QUERY = "which rivers flow through the city"


def _documents(n=9, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120))) for _ in range(n)]


# (in, out) widths of every linear layer of the released 0.6B, 4B and 8B models.
RELEASED_WIDTHS = [(1024, 2048), (1024, 1024), (2048, 1024), (1024, 3072), (3072, 1024),
                   (2560, 4096), (4096, 2560), (2560, 9728), (9728, 2560),
                   (4096, 1024), (12288, 4096), (4096, 12288)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("widths", RELEASED_WIDTHS[:5] + [RELEASED_WIDTHS[8]], ids=str)
def test_tiled_linear_rows_do_not_depend_on_their_batch_mates(dtype, widths):
    torch.manual_seed(0)
    k, n = widths
    linear = torch.nn.Linear(k, n, bias=False).to(dtype)
    layer = TiledLinear(linear, tile_rows=64)
    x = torch.randn(300, k, dtype=dtype)
    reference = torch.cat([layer(x[i : i + 1]) for i in range(0, 300, 37)])
    for rows in (1, 33, 64, 65, 190, 300):  # tails, exact tiles, several tiles
        got = layer(x[:rows])[0:rows:37]
        assert torch.equal(got, reference[: got.shape[0]]), rows
    shifted = layer(x[5:300])  # every row lands elsewhere in its tile
    assert torch.equal(shifted[32::37], reference[1:])
    other = x.clone()
    other[1:] = torch.randn(299, k, dtype=dtype)  # other rows' values change
    assert torch.equal(layer(other)[0], reference[0])


def test_tiled_linear_computes_the_linear_layer():
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        linear = torch.nn.Linear(96, 40).to(dtype)
        x = torch.randn(2, 70, 96, dtype=dtype)
        expected = linear(x)
        got = TiledLinear(linear, tile_rows=32)(x)
        assert got.shape == (2, 70, 40) and got.dtype == dtype
        assert (got.float() - expected.float()).abs().max() <= tol


def test_tile_linear_layers_replaces_every_linear_layer():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()))
    assert tile_linear_layers(model, tile_rows=16) == 2
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert model(torch.randn(3, 8)).shape == (3, 4)
    with pytest.raises(ValueError, match="tile_rows"):
        TiledLinear(torch.nn.Linear(2, 2), tile_rows=0)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def engine(request, tiny_checkpoint):
    # Small budgets so that the big call runs several passes of different sizes.
    # bf16 with compiled layers on every kind of CPU (their default depends on the kind).
    compile_ = True if request.param == "bfloat16" else None
    config = EngineConfig(max_batch_tokens=700, max_batch_pairs=6, batch_invariant=True, compile_layers=compile_)
    return Reranker.load(str(tiny_checkpoint), device="cpu", dtype=request.param, config=config)


def test_scores_are_bit_identical_alone_in_threes_and_in_big_passes(engine):
    assert engine.scorer.batch_invariant and engine.scorer.packing
    # In bf16 the decoder layers run compiled (rerank_core.compiled): invariance holds with them too.
    bf16 = next(engine.scorer.backbone.parameters()).dtype == torch.bfloat16
    assert engine.compiled_layers == (bf16 and HAS_COMPILER)
    docs = _documents()
    together = engine.score(QUERY, docs)
    alone = [engine.score(QUERY, [doc])[0] for doc in docs]
    threes = [s for i in range(0, len(docs), 3) for s in engine.score(QUERY, docs[i : i + 3])]
    reversed_order = engine.score(QUERY, docs[::-1])[::-1]
    # With another query's documents in the same passes, and each query's prefix in one pass.
    mixed = engine.score_encoded(
        [engine.encode("an unrelated question about music", _documents(7, seed=1)), engine.encode(QUERY, docs)]
    )[1]
    assert together == alone == threes == reversed_order == mixed
    assert len(set(together)) == len(docs)  # real, distinct scores


def test_batch_invariance_is_an_option(tiny_checkpoint):
    engine = Reranker.load(
        str(tiny_checkpoint), device="cpu", dtype="float32", config=EngineConfig(batch_invariant=False)
    )
    assert not engine.scorer.batch_invariant
    assert not any(isinstance(m, TiledLinear) for m in engine.scorer.backbone.modules())
    padded = EngineConfig(packing=False)
    assert not padded.invariant(torch.device("cpu"))
    with pytest.raises(ValueError, match="packed"):
        EngineConfig(packing=False, batch_invariant=True)


def test_untile_linear_layers_puts_the_same_products_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2, bias=False))
    x = torch.randn(5, 8)
    want = model(x)
    tile_linear_layers(model, tile_rows=2)
    assert tiled(model)
    assert untile_linear_layers(model) == 0  # fp32 weights are never reordered: all put back
    assert not tiled(model)
    assert all(type(m) is torch.nn.Linear for m in (model[0], model[2])) and model[2].bias is None
    assert torch.equal(model(x), want)


def test_pair_scorer_refuses_batch_invariance_over_untiled_layers(reranker):
    with pytest.raises(ValueError, match="tiled"):
        PairScorer(reranker.scorer.backbone, reranker.scorer.head, 100, 4, packing=True, batch_invariant=True)
