"""bench/quantized.py's fidelity figures are computed right (the speed figures are not tested)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import quantized as bench  # noqa: E402
from engine import ensure_bf16_copy  # noqa: E402


def test_kendall_tau_b_of_known_orders():
    assert bench.kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert bench.kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # One swapped pair of 6: (5 - 1) / 6.
    assert bench.kendall_tau_b([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)
    # tau-b with a tie in one list: (C - D) / sqrt((C + D + Ta) (C + D + Tb)) = 5 / sqrt(6 * 5).
    assert bench.kendall_tau_b([1, 2, 3, 4], [1, 1, 3, 4]) == pytest.approx(5 / (6 * 5) ** 0.5)
    with pytest.raises(ValueError):
        bench.kendall_tau_b([1, 2], [1])


def test_top_k_percentile_and_the_report():
    assert bench.top_k([0.1, 0.9, 0.5, 0.9], 2) == {1, 3}
    assert bench.percentile([0, 10], 50) == 5 and bench.percentile(list(range(101)), 99) == 99
    reference = [[0.9, 0.8, 0.7, 0.1], [0.2, 0.4, 0.6, 0.8]]
    other = [[0.9, 0.7, 0.8, 0.1], [0.2, 0.4, 0.6, 0.8]]
    report = bench.fidelity(reference, other)
    assert report["max_abs_diff"] == pytest.approx(0.1)
    assert report["mean_diff"] == pytest.approx(0.0)  # +0.1 and -0.1
    assert bench.fidelity([[0.5, 0.4]], [[0.3, 0.3]])["mean_diff"] == pytest.approx(-0.15)
    assert report["mean_kendall_tau"] == pytest.approx((4 / 6 + 1) / 2)
    assert report["min_kendall_tau"] == pytest.approx(4 / 6)
    assert report["top3_agreement"] == 1.0  # the swap stays inside the top 3
    assert (report["pairs"], report["queries"]) == (8, 2)


def test_fidelity_step_on_the_tiny_checkpoint(tiny_checkpoint):
    result = bench.step_fidelity(tiny_checkpoint, ["float32", "int8"], queries=3, docs=4)
    assert result["dtypes"]["float32"]["max_abs_diff"] == 0.0  # the reference against itself
    int8 = result["dtypes"]["int8"]
    assert 0 < int8["max_abs_diff"] < 0.2 and -1 <= int8["min_kendall_tau"] <= 1 and int8["pairs"] == 12


def test_the_int8_emulation_at_this_cpus_weight_width_reproduces_the_int8_engine(tiny_checkpoint):
    # The emulated int8-w8 figures stand for a CPU with 8-bit weights only if the emulation
    # computes what the engine computes: checked here at the width this CPU's engine uses.
    from rerank_core.quantized import Int8Linear, int8_weight_max

    width = {127: "int8-w8", 63: "int8-w7"}[int8_weight_max()]
    # Layer by layer, from the same weights and calibration means: the same outputs.
    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 3072, bias=False)
    means = (torch.randn(1024), torch.randn(1024))
    x = torch.randn(37, 1024)
    engine_layer = Int8Linear(linear, int8_weight_max(), input_means=means)
    emulated_layer = bench.EmulatedInt8Linear(linear, int8_weight_max(), input_means=means)
    assert (emulated_layer(x) - engine_layer(x)).abs().max() <= 1e-5 * engine_layer(x).abs().max()
    # Whole engines: each measures its own bias correction, whose means over the calibration
    # tokens shift where a float rounding moves an activation across a quantization step
    # (~1e-3 of a mean on the tiny model); so the scores agree to that sensitivity, not to 1e-5.
    cases = bench.fidelity_cases(2, 4)
    # bf16 files, as released: the int8 engine quantizes the weights as loaded in bf16, the
    # emulation as stored, which agree only for bf16 files (bench/quantized.py's default).
    checkpoint = ensure_bf16_copy(tiny_checkpoint)
    engine, emulated = bench.load(checkpoint, "int8"), bench.load(checkpoint, width)
    for query, documents in cases:
        assert emulated.score(query, documents) == pytest.approx(engine.score(query, documents), abs=0.02)
    assert all(isinstance(m, bench.EmulatedInt8Linear) for m in emulated.scorer.backbone.modules() if isinstance(m, Int8Linear))
    # The other width is a different model: its scores move.
    other = bench.load(checkpoint, "int8-w7" if width == "int8-w8" else "int8-w8")
    query, documents = cases[0]
    assert max(abs(a - b) for a, b in zip(other.score(query, documents), engine.score(query, documents))) > 1e-4


def test_breakdown_step_accounts_for_each_call(tiny_checkpoint):
    result = bench.step_breakdown(tiny_checkpoint, docs=4)
    fp32, int8 = result["dtypes"]["float32"], result["dtypes"]["int8"]
    assert set(fp32["parts"]) == {"products", "attention", "rest"}
    assert set(int8["parts"]) == {"products", "quantize", "rescale", "attention", "rest"}
    for r in (fp32, int8):
        # Every labelled part was seen, and the parts add up to the call.
        assert all(r["parts"][part] > 0 for part in r["parts"] if part != "rest")
        assert sum(r["parts"].values()) == pytest.approx(r["seconds"])
        assert 0 < r["shares"]["products"] < 1
    fp32_rest = fp32["seconds"] - fp32["parts"]["products"]
    assert result["ceiling"] == pytest.approx(fp32["seconds"] / (int8["parts"]["products"] + fp32_rest))


def test_the_eager_quantize_variant_scores_as_int8_and_restores_the_compiled_path(tiny_checkpoint, monkeypatch):
    import rerank_core.quantized as quantized_module

    from .test_compiled import HAS_COMPILER

    checkpoint = ensure_bf16_copy(tiny_checkpoint)
    query, documents = bench.fidelity_cases(1, 4)[0]
    eager, int8 = bench.load(checkpoint, "int8-eager-quantize"), bench.load(checkpoint, "int8")
    before = quantized_module.fused_quantize.failure
    # The eager path calls the module's quantize_activation; the compiled one its own graph.
    calls = []
    real = quantized_module.quantize_activation
    monkeypatch.setattr(quantized_module, "quantize_activation", lambda rows: calls.append(1) or real(rows))
    eager_scores = eager.score(query, documents)
    eager_calls, calls[:] = len(calls), []
    assert eager_scores == int8.score(query, documents)  # the same codes either way: the same scores
    assert eager_calls > 0 and (len(calls) == 0) is HAS_COMPILER
    assert quantized_module.fused_quantize.failure == before


def test_clipped_weight_scales_never_round_worse_than_the_largest_weights():
    torch = pytest.importorskip("torch")
    from rerank_core.quantized import quantize_weight

    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))

    def channel_errors(codes, scales):
        return ((codes.float() * scales[:, None] - weight) ** 2).sum(1)

    errors = {}
    for weight_max in (63, 127):
        codes, scales = bench.clipped_weight(weight, weight_max)
        assert codes.dtype == torch.int8 and int(codes.abs().max()) <= weight_max
        errors[weight_max] = channel_errors(codes, scales), channel_errors(*quantize_weight(weight, weight_max))
        error, plain = errors[weight_max]
        assert bool((error <= plain).all())  # ratio 1.0 is among the candidates
    # At 7 bits, in some channels a scale a little below the largest weight rounds the rest finer
    # for more than it costs the weight it saturates (at 8 bits, on these Gaussian weights, none).
    error, plain = errors[63]
    assert int((error < plain).sum()) >= 4 and float(error.sum()) < float(plain.sum())


def test_part_variants_quantize_only_their_part(tiny_checkpoint):
    from rerank_core.quantized import quantized

    checkpoint = ensure_bf16_copy(tiny_checkpoint)
    query, documents = bench.fidelity_cases(1, 4)[0]
    reference = bench.load(checkpoint, "float32").score(query, documents)
    moved = {}
    for variant in bench.PART_VARIANTS:
        engine = bench.load(checkpoint, variant)
        moved[variant] = max(abs(a - b) for a, b in zip(engine.score(query, documents), reference))
        assert quantized(engine.scorer.backbone) is variant.startswith("int8")
    assert all(0 < d < 0.2 for d in moved.values()), moved
    # 8-bit weights round half as coarsely as 7-bit ones.
    assert moved["float32-w8"] < moved["float32-w7"]
