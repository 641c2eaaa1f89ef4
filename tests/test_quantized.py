"""Quantized scoring (rerank_core.quantized): int8 on CPU through every path, fp8's refusals."""

from __future__ import annotations

import json

import pytest
import torch

from rerank_core import EngineConfig, Reranker
from rerank_core.cpu import cpu_features, force_cpu_features
from rerank_core.quantized import (
    CODE_OFFSET,
    ROUNDING_BLOCK,
    Int8Linear,
    QuantizedDtypeError,
    _FusedQuantize,
    calibration_batch,
    cast_around_embeddings,
    check_device,
    compute_dtype,
    dequantize_activation,
    fused_quantize,
    gptq_factor,
    gptq_weight,
    gptq_weights,
    gram,
    int8_reference,
    int8_weight_max,
    quantize_activation,
    quantize_int8,
    quantize_weight,
    weight_scales,
)

from .reference import official_scores
from .service_helpers import app_args, post
from .test_cli import assert_clean_error, cli
from .test_compiled import HAS_COMPILER

QUERY = "What is the capital of France?"
DOCS = [
    "Paris is the capital and largest city of France.",
    "The Eiffel Tower was built for the 1889 World's Fair and stands in Paris.",
    "Berlin is the capital of Germany. " * 6,
    "Bananas are yellow.",
    "France borders Spain, Italy, Germany, Belgium, Luxembourg and Switzerland.",
]
# The widths of the released models' linear layers (0.6B: 1024 -> 2048/1024/3072 and back).
WIDTHS = [(64, 96), (1024, 2048), (2048, 1024), (1024, 3072), (3072, 1024)]


# The layer ----------------------------------------------------------------------------------------


def test_weight_max_is_what_this_cpus_products_handle_exactly():
    weight_max = int8_weight_max()
    assert weight_max in (63, 127)
    # The other choice: where 63 was chosen, full-range weights really do come out wrong.
    if weight_max == 63:
        torch.manual_seed(0)
        layer = Int8Linear(torch.nn.Linear(1024, 256, bias=False), 127)
        x = torch.randn(64, 1024)
        assert (layer(x).double() - int8_reference(layer, x)).abs().max() > 1e-2


def test_weight_and_activation_codes_are_symmetric_per_channel_and_per_row():
    torch.manual_seed(1)
    weight = torch.randn(8, 32) * torch.arange(1, 9)[:, None]
    codes, scales = quantize_weight(weight, 63)
    assert codes.dtype == torch.int8 and codes.abs().amax(1).tolist() == [63] * 8
    assert torch.allclose(codes.float() * scales[:, None], weight, atol=float(scales.max()) / 2 + 1e-6)
    rows = torch.randn(5, 32) * torch.tensor([1e-3, 1.0, 10.0, 1e3, 0.0])[:, None]
    act, row_scales = quantize_activation(rows)
    assert act.dtype == torch.uint8 and row_scales.shape == (5, 1)
    centred = act.int() - CODE_OFFSET
    assert centred[:4].abs().amax(1).tolist() == [127] * 4 and centred[4].abs().max() == 0  # a zero row stays zero
    assert torch.allclose(centred.float() * row_scales, rows, rtol=0, atol=float(row_scales.max()) / 2 + 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_activation_quantization_is_the_eager_one_bit_for_bit(dtype):
    torch.manual_seed(4)
    fused = _FusedQuantize()
    # One row (a size inductor specializes), many rows, every width of the 0.6B model; rows from
    # zero to very large, halves exactly between two codes (round half to even in both).
    for rows, width in [(1, 1024), (37, 1024), (300, 2048), (301, 3072)]:
        x = (torch.randn(rows, width) * torch.logspace(-3, 3, rows)[:, None]).to(dtype)
        x[0, :4] = torch.tensor([127.0, -127.0, 0.5, 1.5], dtype=dtype)  # row 0's scale is 1: .5 ties
        if rows > 1:
            x[1] = 0
        want, got = quantize_activation(x), fused(x)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (rows, width)
    # Compiled where a C++ compiler is (the eager fall-back is the next test's).
    assert (fused.failure is None) is HAS_COMPILER


def test_the_activation_quantization_runs_eagerly_when_compiling_fails(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore lines")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    fused = _FusedQuantize()
    x = torch.randn(5, 64)
    with caplog.at_level("WARNING", logger="rerank_core.quantized"):
        for _ in range(3):
            assert all(torch.equal(a, b) for a, b in zip(fused(x), quantize_activation(x)))
    assert fused.failure == "RuntimeError: InvalidCxxCompiler: No working C++ compiler found"
    assert sum("runs eagerly" in r.getMessage() for r in caplog.records) == 1  # said once, not per call


def test_an_error_eager_quantization_raises_too_keeps_the_compiled_path():
    fused = _FusedQuantize()
    with pytest.raises(NotImplementedError, match="ComplexFloat"):  # eager's own error, not the compiler's
        fused(torch.randn(4, 8).to(torch.complex64))
    assert fused.failure is None
    x = torch.randn(5, 64)
    assert all(torch.equal(a, b) for a, b in zip(fused(x), quantize_activation(x)))
    assert fused.failure is None


@pytest.mark.parametrize("width", WIDTHS)
def test_int8_linear_is_the_integer_product_it_promises(width):
    torch.manual_seed(2)
    linear = torch.nn.Linear(*width, bias=width[0] == 64)
    layer = Int8Linear(linear, int8_weight_max())
    x = torch.randn(3, 37, width[0])
    y = layer(x)
    assert y.shape == (3, 37, width[1]) and y.dtype == torch.float32
    exact = int8_reference(layer, x)
    assert (y.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    # Quantization moves the output, but by a few percent of its range, not more.
    assert (y - linear(x)).abs().max() <= 0.1 * linear(x).abs().max()


def test_int8_linear_rows_do_not_depend_on_their_neighbours():
    """Exact integer sums: a row's output is bit-identical alone, in a small or a large product."""
    torch.manual_seed(3)
    layer = Int8Linear(torch.nn.Linear(1024, 3072, bias=False), int8_weight_max())
    x = torch.randn(517, 1024) * torch.logspace(-2, 2, 517)[:, None]
    together = layer(x)
    for r in (0, 1, 255, 516):
        assert torch.equal(layer(x[r : r + 1]), together[r : r + 1])
    assert torch.equal(layer(x[100:140]), together[100:140])


def test_bias_correction_removes_the_mean_output_error_over_its_inputs():
    """Inputs sharing a large common part (as Qwen3's do) turn fixed rounding errors into a
    constant output error; the correction measured on those inputs removes its mean."""
    torch.manual_seed(4)
    linear = torch.nn.Linear(1024, 256, bias=True)
    x = 3 * torch.randn(1024) + torch.randn(400, 1024)  # a common vector plus per-token variation
    codes, scales = quantize_activation(x)
    means = (x.double().mean(0), dequantize_activation(codes, scales).mean(0))
    plain = Int8Linear(linear, int8_weight_max())
    corrected = Int8Linear(linear, int8_weight_max(), input_means=means)
    expected = linear(x).double()
    plain_shift = (plain(x).double() - expected).mean(0)
    corrected_shift = (corrected(x).double() - expected).mean(0)
    assert plain_shift.abs().max() > 100 * corrected_shift.abs().max()
    assert corrected_shift.abs().max() < 1e-5
    # The correction is a bias, so the layer is still the integer product it promises.
    assert (corrected(x).double() - int8_reference(corrected, x)).abs().max() <= 1e-5 * expected.abs().max()
    dequantized_weight = corrected.weight_codes.double() * corrected.weight_scale.double()[:, None]
    correction = linear.weight.double() @ means[0] - dequantized_weight @ means[1]
    assert torch.allclose(corrected.bias.double() - plain.bias.double(), correction, atol=1e-5)


def _correlated_inputs(rows: int, generator: torch.Generator) -> torch.Tensor:
    """Layer inputs as Qwen3's look: a common part, and channels of very different energy."""
    common = 2 * torch.randn(512, generator=torch.Generator().manual_seed(11))
    energy = torch.linspace(0.1, 3.0, 512)
    return common + torch.randn(rows, 512, generator=generator) * energy


@pytest.mark.parametrize("width", [250, 300])
def test_gram_is_the_full_product_from_its_upper_blocks(width):
    x = torch.randn(400, width, generator=torch.Generator().manual_seed(width))
    assert torch.allclose(gram(x, block=100), x.t() @ x, rtol=1e-5, atol=1e-4)


def test_gptq_factor_is_a_lower_triangular_factor_of_the_damped_hessian():
    x = _correlated_inputs(300, torch.Generator().manual_seed(1))
    x[:, 7] = 0  # a channel no input uses
    factor = gptq_factor(x, damping=0.1)
    hessian = (x.double().t() @ x.double())
    hessian[7, 7] = 1.0
    assert torch.equal(factor.order, torch.argsort(hessian.diagonal().float(), descending=True))
    assert factor.dead.nonzero().flatten().tolist() == [7]
    ordered = hessian[factor.order][:, factor.order]
    ordered.diagonal().add_(0.1 * ordered.diagonal().mean())
    lower = factor.lower.double()
    assert torch.equal(lower, lower.tril()) and bool((lower.diagonal() > 0).all())
    assert (lower.t() @ lower - ordered).abs().max() <= 1e-5 * ordered.abs().max()  # float32 factorization


def _textbook_gptq(weight: torch.Tensor, inputs: torch.Tensor, weight_max: int, damping: float) -> torch.Tensor:
    """GPTQ as its paper writes it, in float64 and unblocked: the upper Cholesky factor U of the
    damped inverse Hessian, columns in decreasing input energy, each column's rounding error
    divided by U's diagonal and taken off the later columns along U's row."""
    x = inputs.double()
    hessian = x.t() @ x
    order = torch.argsort(hessian.diagonal(), descending=True)
    hessian = hessian[order][:, order]
    hessian.diagonal().add_(damping * hessian.diagonal().mean())
    upper = torch.linalg.cholesky(torch.linalg.inv(hessian), upper=True)
    scales = weight_scales(weight, weight_max).double()
    w = weight.double()[:, order].clone()
    codes = torch.empty_like(w)
    for i in range(w.shape[1]):
        codes[:, i] = torch.round(w[:, i] / scales).clamp(-weight_max, weight_max)
        error = (w[:, i] - codes[:, i] * scales) / upper[i, i]
        w[:, i + 1:] -= error[:, None] * upper[i, i + 1:][None, :]
    restored = torch.empty_like(codes)
    restored[:, order] = codes
    return restored.to(torch.int8)


@pytest.mark.parametrize("width", [63, 127])
def test_gptq_weights_are_the_papers_gptq_codes(width):
    """The nearest-plane form (L of H = L^T L, no inverse) picks the codes of the paper's
    inverse-Hessian form; blocks and float32 move at most a tie's worth of codes, by one."""
    linear = torch.nn.Linear(256, 96, bias=False)
    torch.nn.init.normal_(linear.weight, std=0.05, generator=torch.Generator().manual_seed(7))
    x = _correlated_inputs(600, torch.Generator().manual_seed(8))[:, :256]
    expected = _textbook_gptq(linear.weight.detach(), x, width, 0.1)
    codes, _ = gptq_weight(linear.weight, gptq_factor(x, damping=0.1), width, block=32)
    differing = codes.int() != expected.int()
    assert int(differing.sum()) <= 0.002 * codes.numel()
    assert int((codes.int() - expected.int()).abs().max()) <= 1


def test_gptq_weights_round_layers_of_one_input_together_as_each_alone():
    """q/k/v are rounded as one weight of all their output channels: each layer's codes and
    scales are those it gets on its own (up to a tie's worth of codes)."""
    x = _correlated_inputs(500, torch.Generator().manual_seed(9))
    weights = [torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)) * 0.05 for rows in (64, 32, 48)]
    factor = gptq_factor(x)
    together = gptq_weights(weights, factor, 63)
    assert [codes.shape for codes, _ in together] == [w.shape for w in weights]
    for weight, (codes, scales) in zip(weights, together):
        alone_codes, alone_scales = gptq_weight(weight, factor, 63)
        assert torch.equal(scales, alone_scales) and codes.is_contiguous()
        assert int((codes != alone_codes).sum()) <= 0.002 * codes.numel()
        assert int((codes.int() - alone_codes.int()).abs().max()) <= 1


@pytest.mark.parametrize("width", [63, 127])
def test_gptq_rounding_moves_the_layers_outputs_less_than_nearest_rounding(width):
    """GPTQ keeps quantize_weight's scales and code range, and over the inputs it was fitted on
    (and fresh ones like them) the layer's output error is smaller than nearest rounding's."""
    linear = torch.nn.Linear(512, 256, bias=False)
    torch.nn.init.normal_(linear.weight, std=0.05, generator=torch.Generator().manual_seed(2))
    fitted, fresh = (_correlated_inputs(1000, torch.Generator().manual_seed(seed)) for seed in (3, 4))
    nearest_codes, nearest_scales = quantize_weight(linear.weight, width)
    codes, scales = gptq_weight(linear.weight, gptq_factor(fitted), width)
    assert codes.dtype == torch.int8 and codes.shape == nearest_codes.shape
    assert torch.equal(scales, nearest_scales) and codes.abs().max() <= width
    assert not torch.equal(codes, nearest_codes)

    def error(codes, x):
        return float(((x @ (codes.float() * scales[:, None]).t()) - linear(x).detach()).pow(2).mean())

    assert error(codes, fitted) < 0.5 * error(nearest_codes, fitted)
    assert error(codes, fresh) < 0.8 * error(nearest_codes, fresh)


def test_int8_linear_built_from_chosen_codes_is_still_the_integer_product_it_promises():
    linear = torch.nn.Linear(512, 256, bias=True)
    fitted, fresh = (_correlated_inputs(400, torch.Generator().manual_seed(seed)) for seed in (5, 6))
    codes, scales = gptq_weight(linear.weight, gptq_factor(fitted), int8_weight_max())
    layer = Int8Linear(linear, int8_weight_max(), weight=(codes, scales))
    assert torch.equal(layer.weight_codes, codes) and torch.equal(layer.weight_scale, scales)
    assert (layer(fresh).double() - int8_reference(layer, fresh)).abs().max() <= 1e-5 * linear(fresh).abs().max()


def test_calibrated_layers_reproduce_the_float_models_mean_outputs_on_the_calibration_tokens(tiny_checkpoint):
    """quantize_int8's correction, layer after layer: over the calibration batch's real tokens
    (padding left out), every int8 layer has its float layer's mean output in the float model,
    whatever drift the int8 layers before it left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    batch = calibration_batch(tokenizer)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1 and batch["input_ids"].shape[1] == lengths.max()  # right-padded
    mask = batch["attention_mask"].bool()

    def mean_outputs(decoder, kind) -> dict[str, torch.Tensor]:
        means = {}
        for name, module in decoder.named_modules():
            if isinstance(module, kind):
                module.register_forward_hook(lambda m, args, out, name=name: means.__setitem__(name, out[mask].double().mean(0)))
        with torch.inference_mode():
            decoder(inputs_embeds=decoder.get_input_embeddings()(batch["input_ids"]).float(),
                    attention_mask=batch["attention_mask"])
        return means

    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16).get_decoder()  # noqa: E731
    expected = mean_outputs(load().float(), torch.nn.Linear)
    decoder = load()
    float_weights = {name: m.weight.detach().clone() for name, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)}
    attention = decoder.config._attn_implementation
    shapes = []
    decoder.layers[0].register_forward_pre_hook(lambda layer, args: shapes.append(tuple(args[0].shape)))
    assert quantize_int8(decoder, keep_codes=True, calibration=batch) == 7 * decoder.config.num_hidden_layers
    # Both passes ran the real tokens packed into one row (no padding computed), and the model's
    # attention is back as it was.
    assert shapes == [(1, int(lengths.sum()), decoder.config.hidden_size)] * 2
    assert decoder.config._attn_implementation == attention == "sdpa"
    # Rounded by GPTQ, not to the nearest code, with the nearest code's scales.
    rounded = {name: quantize_weight(weight, int8_weight_max()) for name, weight in float_weights.items()}
    layers = dict(decoder.named_modules())
    assert all(torch.equal(layers[name].weight_scale, rounded[name][1]) for name in rounded)
    assert sum(not torch.equal(layers[name].weight_codes, rounded[name][0]) for name in rounded) == len(rounded)
    got = mean_outputs(decoder.float(), Int8Linear)
    plain = load()
    quantize_int8(plain)
    uncorrected = mean_outputs(plain.float(), Int8Linear)
    assert set(got) == set(expected)
    for name in got:
        assert (got[name] - expected[name]).abs().max() <= 1e-5 * expected[name].abs().max(), name
        # Without the correction the mean outputs are off by far more than float rounding.
        assert (uncorrected[name] - expected[name]).abs().max() > 1e-3 * expected[name].abs().max(), name


def test_int8_linear_keeps_a_bf16_input_in_bf16():
    layer = Int8Linear(torch.nn.Linear(64, 32, bias=False), int8_weight_max())
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert (y.double() - int8_reference(layer, x)).abs().max() <= 2e-2 * y.abs().max()


def test_int8_linear_rounds_a_bf16_output_once_after_its_scales_and_bias():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512)
    layer = Int8Linear(linear, int8_weight_max(), input_means=(torch.randn(256), torch.randn(256)))
    # Rows over several rounding blocks, the last one partial.
    x = torch.randn(2 * ROUNDING_BLOCK + 37, 256).bfloat16()
    # The same codes from the same values: only the output's rounding differs.
    once = layer(x.float()).bfloat16()
    assert torch.equal(layer(x), once)


# The engine ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_engine(tiny_checkpoint):
    return Reranker.load(str(tiny_checkpoint), device="cpu", dtype="int8")


@pytest.fixture(scope="module")
def int8_official(tiny_checkpoint):
    """The model card's procedure (unpacked, padded, full vocabulary) on the same int8 model,
    everything around its int8 layers in float64 (see ``int8_float64_engine``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint, padding_side="left")
    quantize_int8(model.get_decoder(), calibration=calibration_batch(tokenizer))
    model.double().eval()
    return model, tokenizer


def test_int8_engine_quantizes_the_decoders_linear_layers_only(int8_engine):
    decoder = int8_engine.scorer.backbone
    layers = [m for m in decoder.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 7 * decoder.config.num_hidden_layers
    assert not any(isinstance(m, torch.nn.Linear) for m in decoder.modules())
    # Only the reordered copy of each weight is held: the plain codes would double the int8 bytes.
    assert all(m.weight_codes is None and m.weight_packed.dtype == torch.int8 for m in layers)
    # The embedding table stays as loaded (bf16, half a float32 copy's bytes); its lookups leave
    # it in the float dtype the rest computes in (float32 on a CPU without native bf16).
    float_dtype = EngineConfig(device="cpu", dtype="int8").torch_dtype()
    assert decoder.embed_tokens.weight.dtype == torch.bfloat16 and compute_dtype(decoder) == float_dtype
    assert decoder.embed_tokens(torch.tensor([[1, 2]])).dtype == float_dtype
    assert decoder.norm.weight.dtype == float_dtype
    assert int8_engine.scorer.head.weight.dtype == torch.float32  # the yes/no head is never quantized
    assert int8_engine.scorer.packing  # the same packed passes as the float dtypes
    # The engine's layers quantize their activations through the compiled kernel (the start-up
    # probe compiled it).
    assert (fused_quantize.failure is None) is HAS_COMPILER


@pytest.fixture(scope="module")
def int8_float64_engine(tiny_checkpoint):
    """The int8 engine with everything around its int8 layers in float64, for parity.

    Per-token activation codes make an int8 model a step function of its float values: where two
    procedures' float32 rounding differs (a packed row's attention sums keys in another order),
    an activation may land on the other side of a rounding boundary, and on the tiny model one
    such flip moves scores by up to ~1e-2 (seen between the model card's own batched and one-pair
    passes). In float64 those differences are ~1e-16 and no code flips, so the engine's packing,
    prefix sharing and sliced head are compared with the model card's procedure exactly; the int8
    products are exact integer sums either way. Built as float32 around (what a CPU without
    native bf16 runs, whatever this one is), then cast."""
    with force_cpu_features(cpu_features().capped("AVX2")):
        engine = Reranker.load(str(tiny_checkpoint), device="cpu", dtype="int8")
    cast_around_embeddings(engine.scorer.backbone, torch.float64)
    assert compute_dtype(engine.scorer.backbone) == torch.float64 and engine.scorer.packing
    return engine


def test_int8_engine_matches_the_model_cards_procedure_on_the_int8_model(int8_float64_engine, int8_official):
    model, tokenizer = int8_official
    expected = official_scores(model, tokenizer, QUERY, DOCS)
    assert max(abs(a - b) for a, b in zip(int8_float64_engine.score(QUERY, DOCS), expected, strict=True)) <= 1e-5
    instruction = "Judge whether the passage names a city"
    expected = official_scores(model, tokenizer, "cities", DOCS, instruction=instruction)
    got = int8_float64_engine.score("cities", DOCS, instruction)
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) <= 1e-5


def test_int8_engine_as_this_cpu_runs_it_stays_near_the_model_cards_procedure(int8_engine, int8_official):
    # In float32 or bf16 around the int8 layers (bf16 where the CPU multiplies it natively:
    # EngineConfig.torch_dtype), float rounding flips activation codes (int8_float64_engine),
    # each flip moving the tiny model's scores by up to ~1e-2: bounded here as the bf16 engine's
    # scores are against the model card (tests/test_cpu_matrix.py).
    model, tokenizer = int8_official
    expected = official_scores(model, tokenizer, QUERY, DOCS)
    assert max(abs(a - b) for a, b in zip(int8_engine.score(QUERY, DOCS), expected, strict=True)) <= 3e-2


def test_int8_engine_without_prefix_sharing_or_packing_gives_the_same_scores(tiny_checkpoint, int8_engine):
    scores = int8_engine.score(QUERY, DOCS)
    for settings in ({"share_prefix": False}, {"packing": False}):
        other = Reranker.load(str(tiny_checkpoint), config=EngineConfig(device="cpu", dtype="int8", **settings))
        assert max(abs(a - b) for a, b in zip(other.score(QUERY, DOCS), scores, strict=True)) <= 1e-5


def test_int8_scores_move_from_float32_but_stay_scores(reranker, int8_engine):
    fp32, int8 = reranker.score(QUERY, DOCS), int8_engine.score(QUERY, DOCS)
    assert all(0.0 <= s <= 1.0 for s in int8)
    assert 0 < max(abs(a - b) for a, b in zip(fp32, int8)) < 0.2


def test_int8_long_documents_are_scored_by_their_best_window(tiny_checkpoint):
    engine = Reranker.load(str(tiny_checkpoint), config=EngineConfig(device="cpu", dtype="int8", max_length=96))
    long_doc = " ".join(DOCS * 4)
    windows = engine.encode_windows(QUERY, [long_doc], max_chunks_per_doc=4)
    assert windows.num_windows > 1
    best = engine.score(QUERY, [long_doc], max_chunks_per_doc=4)[0]
    per_window = engine.score_encoded([windows.encoded])[0]  # one probability per window
    assert best == pytest.approx(max(per_window), abs=1e-6)
    assert best != pytest.approx(engine.score(QUERY, [long_doc])[0], abs=1e-6)  # not the first window's


def test_int8_batch_invariance_holds_without_tiles(tiny_checkpoint):
    engine = Reranker.load(str(tiny_checkpoint), config=EngineConfig(device="cpu", dtype="int8", batch_invariant=True))
    assert engine.scorer.batch_invariant
    together = engine.score(QUERY, DOCS)
    for i, doc in enumerate(DOCS):
        assert engine.score(QUERY, [doc])[0] == together[i]  # bit for bit
    mixed = engine.score_pairs([("cities", DOCS[0]), (QUERY, DOCS[2]), ("cities", DOCS[3]), (QUERY, DOCS[4])])
    assert mixed[1] == together[2] and mixed[3] == together[4]


# Refusals -----------------------------------------------------------------------------------------


def test_fp8_on_a_cpu_is_refused_before_the_weights_are_read(tiny_checkpoint, monkeypatch):
    import transformers

    def must_not_load(*args, **kwargs):
        raise AssertionError("weights read before the dtype was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_load)
    with pytest.raises(QuantizedDtypeError, match=r"fp8 needs a CUDA GPU with compute capability 8.9.*device is cpu"):
        Reranker.load(str(tiny_checkpoint), dtype="fp8")  # device "auto" resolves to this CPU
    with pytest.raises(ValueError, match=r"dtype fp8 runs on cuda only, not on device 'cpu'"):
        Reranker.load(str(tiny_checkpoint), device="cpu", dtype="fp8")


def test_fp8_on_a_gpu_without_fp8_names_the_gpu_and_its_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(QuantizedDtypeError, match=r"8\.9 or higher; NVIDIA A100-SXM4-80GB \(cuda:0\) has 8\.0"):
        check_device("fp8", torch.device("cuda:0"))


@pytest.mark.parametrize("error, message", [
    (ImportError("No module named 'torchao'"), r"fp8 needs torchao: pip install 'qwen3-rerank-serve\[fp8\]'"),
    # A torchao built for another torch: its import fails, but not with ImportError.
    (AttributeError("module 'torch' has no attribute 'int1'"),
     r"torchao is installed but does not import with torch .*AttributeError: module 'torch' has no attribute 'int1'"),
])
def test_fp8_on_a_hopper_gpu_without_a_working_torchao_says_what_to_install(monkeypatch, error, message):
    import builtins

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise error
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(QuantizedDtypeError, match=message):
        check_device("fp8", torch.device("cuda:0"))


def test_int8_off_cpu_and_unknown_dtypes_are_refused_by_the_config():
    with pytest.raises(ValueError, match="dtype int8 runs on cpu only, not on device 'cuda'"):
        EngineConfig(device="cuda", dtype="int8")
    with pytest.raises(ValueError, match="dtype fp8 runs on cuda only"):
        EngineConfig(device="cpu", dtype="fp8")
    with pytest.raises(ValueError, match="one of float32, bfloat16, float16, int8, fp8, got 'int4'"):
        EngineConfig(dtype="int4")
    with pytest.raises(QuantizedDtypeError, match="int8 runs on CPU only.*the device is cuda:0"):
        check_device("int8", torch.device("cuda:0"))


def test_compile_layers_with_int8_is_refused_by_the_config():
    with pytest.raises(ValueError, match="compile_layers does not apply to dtype int8"):
        EngineConfig(device="cpu", dtype="int8", compile_layers=True)
    assert EngineConfig(device="cpu", dtype="int8").compiled_layers(torch.device("cpu"), torch.float32) is False


def test_the_cpu_config_default_stays_float():
    import yaml

    from .test_configs import CONFIGS

    for path in CONFIGS:
        args = yaml.safe_load(path.read_text())["applications"][0]["args"]
        assert all(m.get("dtype", "auto") not in ("int8", "fp8") for m in args["models"]), path
    assert EngineConfig().quantization is None and EngineConfig(dtype="auto").torch_dtype() != torch.int8


def test_serve_config_refuses_a_quantized_dtype_on_the_wrong_device(tiny_checkpoint):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="dtype fp8 runs on cuda only, not on device 'cpu'"):
        app_args(tiny_checkpoint, model={"dtype": "fp8"})


# The user's paths: CLI, HTTP, batch ----------------------------------------------------------------


def test_cli_run_scores_in_int8(tiny_checkpoint, int8_engine, tmp_path):
    out = tmp_path / "int8.json"
    result = cli("run", "-m", tiny_checkpoint, "--device", "cpu", "--dtype", "int8", "-i", f"query: {QUERY}",
                 *[a for d in DOCS for a in ("-i", d)], "--json", "-o", out)
    assert result.returncode == 0, result.stderr
    body = json.loads(out.read_text(encoding="utf-8"))
    by_index = {r["index"]: r["relevance_score"] for r in body["results"]}
    expected = int8_engine.score(QUERY, DOCS)
    assert max(abs(by_index[i] - s) for i, s in enumerate(expected)) <= 1e-5


def test_cli_run_with_fp8_on_this_cpu_fails_with_one_line(tiny_checkpoint):
    result = cli("run", "-m", tiny_checkpoint, "--dtype", "fp8", "-i", "query: q", "-i", "d")
    assert_clean_error(result, 1, "fp8 needs a CUDA GPU", "device is cpu")


def test_http_serves_int8_scores(ray_cluster, tiny_checkpoint, int8_engine):
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(app_args(tiny_checkpoint, model={"dtype": "int8"})), name="int8", route_prefix="/int8")
    try:
        r = post(f"{ray_cluster}/int8/rerank", {"model": "tiny", "query": QUERY, "documents": DOCS})
        assert r.status_code == 200, r.text
        expected = int8_engine.score(QUERY, DOCS)
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        assert max(abs(got[i] - s) for i, s in enumerate(expected)) <= 1e-5
        assert [x["index"] for x in r.json()["results"]] == sorted(range(len(DOCS)), key=lambda i: (-expected[i], i))
    finally:
        serve.delete("int8")


def test_batch_cli_scores_a_file_in_int8(ray_cluster, tiny_checkpoint, int8_engine, tmp_path):
    import ray

    from .test_batch import read_output, write_jsonl

    source = write_jsonl(tmp_path / "q.jsonl", [{"query": QUERY, "documents": DOCS, "id": 0}])
    result = cli("batch", source, "-o", tmp_path / "out", "-m", tiny_checkpoint, "--device", "cpu", "--dtype", "int8",
                 "--num-cpus", "0", "--tokenize-cpus", "0.5", "--no-progress",
                 "--address", ray.get_runtime_context().gcs_address)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = read_output(tmp_path / "out")
    expected = int8_engine.score(QUERY, DOCS)
    assert max(abs(a - b) for a, b in zip(row["scores"], expected, strict=True)) <= 1e-5
