"""Quantized scoring: the decoder's linear layers in int8 (CPU) or fp8 (CUDA), opt-in.

Both modes quantize the same layers, once, at load: every ``nn.Linear`` of the decoder (the
q/k/v/o projections and the gate/up/down MLP of each layer), from the checkpoint's bf16 weights.
Embeddings, norms, RoPE, attention, the yes/no head and its sigmoid stay in the float dtype
(bfloat16 where the device multiplies it natively, float32 elsewhere); the head is never
quantized (an fp8 head is what turned vLLM's fp8 rerankers into 0/1 scorers).

**int8 (CPU).** Weights per output channel and activations per token, both symmetric
(``x ≈ s_x * q_x``, ``W[j] ≈ s_j * q_j``). Each product is oneDNN's int8 matrix product through
torch (``torch.ops.onednn.qlinear_pointwise``, the kernel inductor lowers quantized linears to on
x86), with the weight reordered once for it; the per-token scale is applied to its output.
Because the sums are exact int32 sums, a row's output depends on its own inputs only, whatever
else shares the product: these layers are batch-invariant as they are, without tiles. The
activations' quantization runs compiled (:class:`_FusedQuantize`: the same codes, fused).

Rounding errors are zero-mean per weight but fixed per model, and Qwen3's layer inputs share a
large common component (the prompt template's tokens, and the mean of the residual stream), so a
layer's error has a constant part, and the parts add up to a shift of the scores: without
correction, the int8 scores of the benchmark's cases all moved the same way (docs/quantized.md).
The engine removes it with empirical bias correction (Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction", 2019), applied in the order the layers run: at
load, a few template prompts
(:data:`CALIBRATION_PAIRS`; :func:`quantize_int8` with ``calibration``) measure each linear
layer's mean input ``E[x]`` in the float model and its mean dequantized input ``E[x^]`` in the
model quantized up to it, and the layer adds ``W E[x] - W^ E[x^]`` (``W^``: the dequantized
weight) as a bias: over those prompts, each int8 layer then has its float layer's mean output.
The same pass rounds each layer's weights by GPTQ (:func:`gptq_weights`; Frantar et al. 2023) on
the inputs it sees there, rather than to the nearest code: each rounding error is compensated by
the weights of the input columns not yet rounded, so that the layer's outputs, not its weights,
stay close to the float ones. With 7-bit weights (below), GPTQ took the benchmark's largest score
difference from 0.180 (bias correction alone) to 0.107 (docs/benchmarks.md).

CPUs without VNNI (AVX2, AVX-512 without VNNI) multiply int8 with ``vpmaddubsw``, which adds
pairs of products into 16 bits and saturates: with full-range (8-bit) weights a product can come
out wrong by a large amount (measured on an AMD EPYC: 45 % of outputs off by more than 0.05). Such
CPUs get 7-bit weights (``|q| <= 63``), whose pair sums always fit. Which one a CPU needs is not
read from a feature table but measured: :func:`int8_weight_max` multiplies worst-case operands
once and keeps 8-bit weights only where the result is exact.

torchao's int8 config was measured as the first choice and not kept for CPU: in eager mode it
multiplies with ``torch._int_mm``, which on CPU runs at about 1 GMAC/s (6.3 s for one 2048 x 1024
x 3072 product on the EPYC above, against 0.09 s in fp32); compiled with freezing, inductor lowers
it to the same oneDNN kernel, with 8-bit weights, so on AVX2 with the same saturated results. torch's
own fbgemm dynamic linear quantizes activations per tensor: one token's range (Qwen3 has tokens
with very large activations) would set every other token's precision, and a score would depend on
what shares its pass (docs/benchmarks.md, "Quantized scoring").

**fp8 (CUDA, compute capability 8.9 and up).** torchao's float8 dynamic-activation /
float8-weight config with per-row scales (``e4m3``; ``torch._scaled_mm``). torchao is needed only
for this mode (the ``fp8`` extra).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.profiler import record_function

from .config import QUANTIZED_DTYPES
from .cpu import pin_compiled_vector_width
from .errors import error_summary
from .invariant import _replace_submodule
from .memory import release_freed_memory
from .packing import ATTENTION_NAME, Segments
from .prompt import DEFAULT_INSTRUCTION, PREFIX, SUFFIX, body_text

# Smallest scale: an all-zero row or channel quantizes to zeros instead of dividing by zero.
_TINY = 1e-12
# Activations use the symmetric int8 range (-128 is never produced, as in torchao's config).
ACTIVATION_MAX = 127
# Activation codes are stored as uint8, offset by this (see quantize_activation).
CODE_OFFSET = 128

# GPTQ's damping, as a share of the Hessian's mean diagonal: a few thousand calibration tokens
# leave a 3,072-wide Hessian poorly conditioned, and damping keeps the rounding from fitting those
# tokens alone (on the benchmark's cases 0.1 moved scores less than GPTQ's usual 0.01, and as
# little as 0.3: docs/benchmarks.md).
GPTQ_DAMPING = 0.1

log = logging.getLogger(__name__)


class QuantizedDtypeError(ValueError):
    """A quantized dtype this device or installation cannot run (raised at load, never later)."""


def check_device(quantization: str, device: torch.device) -> None:
    """Refuse a quantized dtype the device cannot run, with a message naming the device.

    Raises:
        QuantizedDtypeError: int8 off CPU, fp8 off CUDA, a GPU below compute capability 8.9, or
            fp8 without torchao installed.
    """
    if quantization == "int8":
        if device.type != "cpu":
            raise QuantizedDtypeError(
                f"dtype int8 runs on CPU only (oneDNN's int8 products); the device is {device}; "
                f"on a CUDA GPU with compute capability 8.9 or higher use dtype fp8"
            )
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")):
            raise QuantizedDtypeError("dtype int8 needs torch built with oneDNN (torch.ops.onednn.qlinear_pointwise)")
        return
    if quantization == "fp8":
        if device.type != "cuda":
            raise QuantizedDtypeError(
                f"dtype fp8 needs a CUDA GPU with compute capability 8.9 or higher (Ada, Hopper, "
                f"Blackwell); the device is {device}; on CPU use dtype int8"
            )
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            name = torch.cuda.get_device_name(device)
            raise QuantizedDtypeError(
                f"dtype fp8 needs compute capability 8.9 or higher; {name} ({device}) has "
                f"{capability[0]}.{capability[1]}; use dtype bfloat16 there"
            )
        try:
            import torchao.quantization  # noqa: F401
        except ImportError as e:
            raise QuantizedDtypeError(f"dtype fp8 needs torchao: pip install 'qwen3-rerank-serve[fp8]' ({e})") from e
        except Exception as e:  # a torchao built for another torch can fail at import in other ways
            raise QuantizedDtypeError(
                f"dtype fp8: torchao is installed but does not import with torch {torch.__version__} "
                f"({type(e).__name__}: {e}); install a torchao release made for this torch"
            ) from e
        return
    raise QuantizedDtypeError(f"unknown quantized dtype {quantization!r}; one of {', '.join(QUANTIZED_DTYPES)}")


def weight_scales(weight: torch.Tensor, weight_max: int) -> torch.Tensor:
    """Each output channel's float32 scale for symmetric codes of at most ``weight_max``: its
    largest weight over ``weight_max``."""
    return weight.detach().float().abs().amax(dim=1).clamp_(min=_TINY).div_(weight_max)


def quantize_weight(weight: torch.Tensor, weight_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 codes and float32 scales (:func:`weight_scales`) of a
    ``(out, in)`` weight, each weight rounded to its nearest code."""
    scales = weight_scales(weight, weight_max)
    weight = weight.detach().float()
    codes = torch.round(weight / scales[:, None]).clamp_(-weight_max, weight_max).to(torch.int8)
    return codes, scales


class GptqFactor(NamedTuple):
    """What GPTQ needs of a layer's inputs (:func:`gptq_factor`), shared by the layers that read
    the same inputs (q/k/v; gate/up)."""

    order: torch.Tensor  # input columns, largest energy first
    lower: torch.Tensor  # L, lower triangular, with L^T L the damped Hessian in that order
    dead: torch.Tensor  # columns no input ever used (their weights cannot matter)


def gram(x: torch.Tensor, block: int = 512) -> torch.Tensor:
    """``x.T @ x`` of ``(n, d)`` rows with about half of its products: each block of ``block``
    rows is multiplied from the diagonal on, and mirrored below it (the calibration forms a
    Hessian of up to 3,072 columns over 2,000 tokens for each input of each layer of the 0.6B)."""
    width = x.shape[1]
    out = x.new_empty(width, width)
    for start in range(0, width, block):
        end = min(start + block, width)
        out[start:end, start:] = x[:, start:end].t() @ x[:, start:]
        out[end:, start:end] = out[start:end, end:].t()
    return out


def gptq_factor(inputs: torch.Tensor, damping: float = GPTQ_DAMPING) -> GptqFactor:
    """The factor of ``inputs`` (``(n, in)`` rows) that :func:`gptq_weights` rounds with; the
    Hessian ``X^T X`` is damped by ``damping`` times its mean diagonal (:data:`GPTQ_DAMPING`)."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    energy = x.square().sum(0)  # the Hessian's diagonal
    dead = energy == 0
    order = torch.argsort(energy, descending=True)
    # H = L^T L with L lower triangular, in that order, is a Cholesky factorization from the
    # other end: with J the reversal and J H J = C C^T, L = J C^T J. So the Hessian is formed
    # with its columns in reverse order (J H J directly), and factored as usual. GPTQ's usual
    # upper factor of H^-1 is L^-T; the rounding reads L itself, so no inverse is formed.
    reverse = order.flip(0)
    hessian = gram(x[:, reverse])
    hessian.diagonal()[dead[reverse]] = 1.0
    hessian.diagonal().add_(damping * hessian.diagonal().mean())
    return GptqFactor(order, torch.linalg.cholesky(hessian).t().flip(0, 1), dead)


def gptq_weights(weights: Sequence[torch.Tensor], factor: GptqFactor, weight_max: int,
                 block: int = 128, step: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`quantize_weight`'s codes and scales of each of ``weights`` (layers that read the
    same inputs), the codes rounded by GPTQ (Frantar et al., "GPTQ: Accurate Post-Training
    Quantization for Generative Pre-trained Transformers", 2023) to minimise each layer's output
    error over the inputs of ``factor`` (:func:`gptq_factor`) rather than each weight's own.

    Input columns are rounded one at a time, largest input energy first, each to the code
    nearest its weight plus the compensation for the rounding errors of the columns before it.
    With the damped Hessian ``H = L^T L`` (``L`` lower triangular) and ``e = w - w^`` one output
    row's errors, the output error over the inputs is ``|L e|^2``, and column ``i`` appears first
    in row ``i`` of ``L e``: it is rounded to cancel that row, ``w^_i ≈ w_i + sum_{j<i} L_ij e_j
    / L_ii``. This is GPTQ's update, written with ``L`` rather than the Cholesky factor of
    ``H^-1`` (the "nearest plane" form; the two give the same codes up to float rounding at
    ties). The compensation of a block of columns by all the columns before it is one matrix
    product; within a block it is added column by column. Scales are :func:`quantize_weight`'s
    (each channel's largest weight), so no code is clipped beyond them. The layers are rounded
    together, as one weight of all their output channels: the same codes as one at a time, in one
    column loop instead of one per layer (a third of the steps for q/k/v, half for gate/up).
    """
    scales = [weight_scales(weight, weight_max) for weight in weights]
    # Transposed, (in, out): a column to round is a contiguous row, and updates are rank-1 (ger).
    # The rows already rounded hold their errors from then on (the weights are no longer needed).
    w = torch.cat([weight.detach().t()[factor.order] for weight in weights], dim=1).float()
    w[factor.dead[factor.order]] = 0.0
    scale = torch.cat(scales)
    coupling = factor.lower / factor.lower.diagonal()[:, None]
    codes = torch.empty(w.shape, dtype=torch.int8)
    for start in range(0, w.shape[0], block):
        end = min(start + block, w.shape[0])
        target = torch.addmm(w[start:end], coupling[start:end, :start], w[:start])
        for first in range(start, end, step):
            last = min(first + step, end)
            for i in range(first, last):
                q = target[i - start].div_(scale).round_().clamp_(-weight_max, weight_max)
                codes[i] = q
                error = w[i].addcmul_(q, scale, value=-1)
                target[i + 1 - start:last - start].addr_(coupling[i + 1:last, i], error)
            target[last - start:].addmm_(coupling[last:end, first:last], w[first:last])
    restored = torch.empty_like(codes)
    restored[factor.order] = codes
    restored = restored.t()
    out, first = [], 0
    for weight, weight_scale in zip(weights, scales):
        out.append((restored[first:first + weight.shape[0]].contiguous(), weight_scale))
        first += weight.shape[0]
    return out


def gptq_weight(weight: torch.Tensor, factor: GptqFactor, weight_max: int,
                block: int = 128, step: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gptq_weights` of one layer."""
    return gptq_weights([weight], factor, weight_max, block, step)[0]


def quantize_activation(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 codes of a 2-D activation, stored offset by :data:`CODE_OFFSET` as
    uint8, and each row's float32 scale ``(n, 1)``: ``x ≈ scale * (codes - CODE_OFFSET)``.

    The offset is the same for every row, so oneDNN takes it as one zero point. Its uint8
    products run about 1.2-1.5x faster than int8 ones on AVX2 (docs/benchmarks.md), since an
    int8 input would be shifted to uint8 inside the kernel anyway.
    """
    # abs().amax() is one vectorized pass each; the infinity norm was measured 6x slower.
    scales = rows.abs().amax(dim=-1, keepdim=True).float().clamp_(min=_TINY).div_(ACTIVATION_MAX)
    codes = torch.div(rows, scales).round_().add_(CODE_OFFSET)
    return codes.clamp_(CODE_OFFSET - ACTIVATION_MAX, CODE_OFFSET + ACTIVATION_MAX).to(torch.uint8), scales


def dequantize_activation(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The activation that :func:`quantize_activation`'s ``codes`` and ``scales`` stand for,
    ``scale * (codes - CODE_OFFSET)``, computed in ``dtype``."""
    return (codes.to(dtype) - CODE_OFFSET) * scales.to(dtype)


class _FusedQuantize:
    """:func:`quantize_activation` compiled by inductor (``dynamic=True``: one graph for every
    row count), its eight element-wise steps fused into two loops, the row maxima then the codes.
    Measured 4-11x faster than eager at the 0.6B model's widths on an AVX2 AMD EPYC, with the same
    codes and scales bit for bit (same operations, same rounding; tested). Compiling needs a C++
    compiler: without one, or on any compile error, activations are quantized eagerly from then
    on, and :attr:`failure` says why (logged once). An error that eager quantization raises too
    (the input's, not the compiler's) is raised as eager raises it, and the compiled path stays."""

    def __init__(self):
        self.compiled = None
        self.failure: str | None = None

    def __call__(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.failure is None:
            try:
                if self.compiled is None:
                    pin_compiled_vector_width()
                    self.compiled = torch.compile(quantize_activation, dynamic=True)
                return self.compiled(rows)
            except Exception as e:  # noqa: BLE001  (a missing compiler, an inductor bug: eager is exact too)
                result = quantize_activation(rows)  # raises first if the input is what failed
                self.failure = error_summary(e)
                log.warning("int8: compiling the activation quantization failed (%s); it runs eagerly", self.failure)
                return result
        return quantize_activation(rows)


fused_quantize = _FusedQuantize()


# Rows of an int8 layer's float32 output that exist at a time where the output is bf16 (see
# Int8Linear.forward): a few MB at the models' widths, and still large products for oneDNN.
ROUNDING_BLOCK = 1024

_ONE = torch.ones((), dtype=torch.float32)
_OFFSET = torch.full((), CODE_OFFSET, dtype=torch.int32)


def _int8_product(codes, packed, scales, zero_points, out_dtype: torch.dtype) -> torch.Tensor:
    """oneDNN's product of offset activation codes (:func:`quantize_activation`) with a prepacked
    int8 weight, each output column scaled by its channel's weight scale (the activation's scale
    is left to the caller)."""
    return torch.ops.onednn.qlinear_pointwise.tensor(
        codes, _ONE, _OFFSET, packed, scales, zero_points, None, 1.0, 0, out_dtype, "none", [None], ""
    )


@functools.lru_cache(maxsize=None)
def int8_weight_max() -> int:
    """The largest weight code this CPU's oneDNN int8 products handle exactly: 127, or 63 where
    pairs of products saturate 16 bits (CPUs without VNNI), measured on worst-case operands.

    Raises:
        QuantizedDtypeError: not even 7-bit weights multiply exactly (never seen; refused rather
            than scored wrongly).
    """
    generator = torch.Generator().manual_seed(0)
    k, n = 256, 64
    # Full-range activations of both signs against full-range weights: the largest pair sums.
    signs = torch.randint(0, 2, (8, k), generator=generator) * 2 - 1
    activations = torch.cat([torch.full((1, k), ACTIVATION_MAX), torch.full((1, k), -ACTIVATION_MAX),
                             signs * ACTIVATION_MAX, torch.randint(-127, 128, (8, k), generator=generator)])
    for weight_max in (127, 63):
        weights = (torch.randint(0, 2, (n, k), generator=generator) * 2 - 1) * weight_max
        weights[:8] = weight_max
        weights[8:16] = -weight_max
        exact = activations.double() @ weights.double().t()
        packed = torch.ops.onednn.qlinear_prepack(weights.to(torch.int8), None)
        got = _int8_product((activations + CODE_OFFSET).to(torch.uint8), packed, torch.ones(n),
                            torch.zeros(n, dtype=torch.int64), torch.float32)
        if torch.equal(got.double(), exact):
            if weight_max != 127:
                log.info("int8: this CPU's int8 products saturate with 8-bit weights; weights use 7 bits")
            return weight_max
    raise QuantizedDtypeError("this CPU's oneDNN int8 products are not exact even with 7-bit weights")


class Int8Linear(torch.nn.Module):
    """``y ≈ x @ W.T + b`` with int8 weights (per channel) and int8 activations (per token).

    Contract: ``y[r] = s_x[r] * s_W * (q_x[r] @ q_W.T) + b`` computed with exact integer sums, so
    every output row depends only on its own input row (batch-invariant), and equals
    :func:`int8_reference` up to float32 rounding of the two scale products and the bias. The
    output has the input's dtype, rounded to it once, after the bias.

    Args:
        linear: the layer to replace; its weight is quantized (the float weight is not kept).
        weight_max: largest weight code (:func:`int8_weight_max`).
        keep_codes: also keep the plain codes (``weight_codes``) that :func:`int8_reference`
            reads; off in the engine, where only the reordered copy is needed (it would double
            the int8 weights' memory).
        input_means: ``(E[x], E[x^])``, the layer's mean input and mean dequantized input
            (:func:`quantize_activation`) over calibration tokens: ``b`` then also holds the
            bias correction ``W E[x] - W^ E[x^]`` (module docstring). None: no correction.
        weight: the weight's codes and scales, already chosen (:func:`gptq_weights`); None:
            :func:`quantize_weight`'s.
    """

    def __init__(self, linear: torch.nn.Linear, weight_max: int, keep_codes: bool = True,
                 input_means: tuple[torch.Tensor, torch.Tensor] | None = None,
                 weight: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight_max = weight_max
        codes, self.weight_scale = quantize_weight(linear.weight, weight_max) if weight is None else weight
        # The product reads only the reordered copy.
        self.weight_codes = codes if keep_codes else None
        self.weight_packed = torch.ops.onednn.qlinear_prepack(codes, None)
        self.weight_zero_points = torch.zeros(self.out_features, dtype=torch.int64)
        bias = None if linear.bias is None else linear.bias.detach().float()
        if input_means is not None:
            # Matrix-vector products in float32 (relative error ~1e-6 of terms whose difference
            # is ~1e-2 of them); float64 copies of the weight would be the load's largest
            # transients.
            mean_x, mean_dequantized = (m.float() for m in input_means)
            correction = linear.weight.detach().float() @ mean_x - (codes.float() @ mean_dequantized) * self.weight_scale
            bias = correction if bias is None else bias + correction
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Labelled for torch.profiler (bench/quantized.py's breakdown step); a label costs a few
        # microseconds against milliseconds of product.
        with record_function("int8.quantize"):
            rows = x.reshape(-1, self.in_features).contiguous()
            codes, scales = fused_quantize(rows)
        if x.dtype == torch.float32:
            out = self._rescaled_product(codes, scales)
        else:
            # Products, scales and bias in float32, rounded to x's dtype once, at the end (a bf16
            # product rounded three times, and bf16 in-place products by float32 scales were
            # slower); in blocks of rows, so that one block's float32 output exists at a time,
            # not the whole pass's beside its bf16 copy (0.6 GiB more peak memory on 64 documents).
            out = torch.empty((rows.shape[0], self.out_features), dtype=x.dtype)
            for start in range(0, rows.shape[0], ROUNDING_BLOCK):
                block = slice(start, start + ROUNDING_BLOCK)
                out[block] = self._rescaled_product(codes[block], scales[block])
        return out.reshape(*x.shape[:-1], self.out_features)

    def _rescaled_product(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """The float32 output of activation ``codes`` with per-token ``scales``, bias added."""
        with record_function("int8.product"):
            out = _int8_product(codes, self.weight_packed, self.weight_scale, self.weight_zero_points, torch.float32)
        with record_function("int8.rescale"):
            out.mul_(scales)
            if self.bias is not None:
                out.add_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight_max={self.weight_max}"


def int8_reference(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """What :class:`Int8Linear` computes, in float64 with plain torch ops (the tests' reference).

    Needs a layer built with ``keep_codes=True``.
    """
    if layer.weight_codes is None:
        raise ValueError("int8_reference needs an Int8Linear built with keep_codes=True")
    rows = x.reshape(-1, layer.in_features)
    codes, scales = quantize_activation(rows)
    out = (dequantize_activation(codes, scales) @ layer.weight_codes.double().t()) * layer.weight_scale.double()
    if layer.bias is not None:
        out = out + layer.bias.double()
    return out.reshape(*x.shape[:-1], layer.out_features)


def quantize_int8(module: torch.nn.Module, keep_codes: bool = False, calibration: dict | None = None) -> int:
    """Replace every ``nn.Linear`` inside ``module`` by an :class:`Int8Linear`, in place
    (``keep_codes``: see :class:`Int8Linear`).

    Args:
        calibration: a padded batch (``input_ids``, ``attention_mask``; :func:`calibration_batch`)
            that ``module``, a decoder with ``layers``, runs twice, its real tokens packed into
            one row, to round each linear layer's weights by GPTQ and measure its bias
            correction (module docstring). The passes compute in float32 with at most one
            decoder layer's float32 copy at a time (the first pass) or the float32 weights of
            the layers of one input (q/k/v or gate/up) and their GPTQ factor (the second); the quantized
            layers' norms stay float32 (exact copies of the loaded ones). None: weights rounded
            to the nearest code, no correction.

    Returns:
        the number of layers replaced.
    """
    weight_max = int8_weight_max()
    if calibration is not None:
        _quantize_calibrated(module, weight_max, keep_codes, calibration)
    # Names, not modules: each float layer is freed as soon as it is replaced.
    names = [name for name, child in module.named_modules() if isinstance(child, torch.nn.Linear)]
    for name in names:
        _replace_submodule(module, name, Int8Linear(module.get_submodule(name), weight_max, keep_codes))
    return sum(isinstance(m, Int8Linear) for m in module.modules())


# Pairs for int8's calibration (GPTQ rounding and bias correction): the official template around
# texts of several languages and kinds (prose, code, a table row, a question, an unrelated
# document), short and of a paragraph. Means of layer inputs over them are mostly the template's
# and the residual stream's common part, which every real request shares; the longer ones give
# GPTQ's Hessians more distinct tokens (with only the first eight, short, the benchmark's largest
# score difference was 0.138 instead of 0.107: docs/benchmarks.md).
CALIBRATION_PAIRS: tuple[tuple[str, str], ...] = (
    ("how do solar panels work", "Photovoltaic cells turn sunlight into direct current, which an inverter converts."),
    ("best time to visit kyoto", "Spring brings cherry blossoms; autumn maples draw crowds in November."),
    ("python read csv file", "import csv\nwith open('data.csv') as f:\n    rows = list(csv.reader(f))"),
    ("symptoms of dehydration", "Thirst, dark urine, dizziness and fatigue are common early signs."),
    ("北京的人口是多少", "北京市常住人口约为两千一百万人。"),
    ("quelle est la capitale du Canada", "Ottawa est la capitale fédérale du Canada, en Ontario."),
    ("GDP of Germany 2023", "| country | year | GDP (USD tn) |\n| Germany | 2023 | 4.46 |"),
    ("is coffee bad for you", "Moderate coffee intake is not linked to harm in most adults."),
    ("tenant rights when landlord sells the building",
     "When a rental property is sold, an existing lease generally remains valid and binds the new owner. "
     "The buyer steps into the landlord's position, must honour the agreed rent and term, and takes over the "
     "security deposit. Month-to-month tenants may receive a notice to vacate, but the notice period set by "
     "state law still applies, and eviction without a court order is unlawful in most jurisdictions."),
    ("how does insulin regulate blood sugar",
     "After a meal, rising glucose levels prompt beta cells in the pancreas to release insulin. Insulin binds "
     "to receptors on muscle, fat and liver cells, which then take up glucose from the blood. The liver stores "
     "the surplus as glycogen, and when levels fall, glucagon triggers its release again. In type 2 diabetes "
     "cells respond poorly to insulin, so glucose stays high."),
    ("rust borrow checker error cannot borrow as mutable",
     "fn main() {\n    let mut v = vec![1, 2, 3];\n    let first = &v[0];\n    v.push(4);\n    println!(\"{}\", first);\n}\n"
     "The push needs a mutable borrow of v while first still holds an immutable one; the compiler rejects it "
     "because push may reallocate the vector and leave first dangling. Clone the value or end the borrow first."),
    ("quarterly earnings semiconductor company",
     "The chipmaker reported revenue of $18.1 billion for the quarter, up 34 percent from a year earlier, driven "
     "by demand for data-centre accelerators. Gross margin narrowed to 61 percent on higher packaging costs. "
     "The company guided next-quarter revenue between $19 billion and $20 billion and raised its dividend."),
    ("receta de tortilla de patatas",
     "Pela y corta las patatas en láminas finas, fríelas a fuego lento en abundante aceite con la cebolla. "
     "Bate seis huevos con sal, mezcla las patatas escurridas y deja reposar unos minutos. Cuaja la mezcla en "
     "una sartén, dale la vuelta con un plato y termina de cocinar por el otro lado."),
    ("what causes the northern lights",
     "The 2019 season of the regional football league ended with a penalty shoot-out in the final, after both "
     "sides failed to score in extra time. The home team's goalkeeper saved two attempts, and attendance set a "
     "club record of 41,000 spectators."),
    ("Wie funktioniert eine Wärmepumpe",
     "Eine Wärmepumpe entzieht der Umgebungsluft, dem Erdreich oder dem Grundwasser Wärme und hebt sie mit "
     "einem Verdichter auf ein höheres Temperaturniveau. Das Kältemittel verdampft bei niedriger Temperatur, "
     "wird komprimiert und gibt die Wärme im Verflüssiger an den Heizkreis ab."),
    ("transformer attention complexity long sequences",
     "Self-attention compares every token with every other token, so its time and memory grow with the square "
     "of the sequence length. Sparse patterns, low-rank approximations and kernel methods reduce this cost, "
     "while exact methods such as FlashAttention keep the quadratic work but avoid materialising the score "
     "matrix, which makes long contexts practical on current accelerators."),
)


def calibration_batch(tokenizer) -> dict:
    """:data:`CALIBRATION_PAIRS` in the official template, as one right-padded batch of token ids
    (``input_ids``, ``attention_mask``) for :func:`quantize_int8`'s ``calibration``."""
    texts = [PREFIX + body_text(query, document, DEFAULT_INSTRUCTION) + SUFFIX for query, document in CALIBRATION_PAIRS]
    return dict(tokenizer(texts, padding=True, padding_side="right", return_tensors="pt"))


def _to_float32(value):
    """``value`` with every floating tensor in it (nested in tuples and lists) cast to float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float32(v) for v in value)
    return value


@torch.inference_mode()
def _quantize_calibrated(decoder: torch.nn.Module, weight_max: int, keep_codes: bool, batch: dict) -> None:
    """:func:`quantize_int8`'s calibrated passes: each linear layer of ``decoder.layers``
    replaced by an :class:`Int8Linear` with GPTQ-rounded weights and a bias correction.

    Two passes over ``batch``'s real tokens, packed into one row (:mod:`rerank_core.packing`: no
    padding computed, attention kept per prompt), each decoder layer's float work in float32
    (cast as a pass reaches it). The first, all float, measures each linear layer's mean input
    ``E[x]`` and which layers read the same input. The second quantizes in the order the layers
    run: each linear layer is replaced when it is called (its float product is never computed),
    its mean dequantized input ``E[x^]`` measured on inputs that the int8 layers before it
    produced, and its int8 output goes on instead of its float one. So each correction also
    takes out the mean drift that the int8 layers before it left in its inputs, not just its own
    rounding, and over the calibration tokens every int8 layer has its float layer's mean output.
    The weights of the layers that share an input (q/k/v; gate/up) are rounded together by GPTQ
    (:func:`gptq_weights`) on that input, before the correction is measured on the codes chosen.
    """
    mask = batch["attention_mask"].bool()
    # The real tokens in row order (the batch's padding left out), one segment per prompt.
    segments = [int(n) for n in mask.sum(1)]
    ids = batch["input_ids"][mask][None]
    names = {module: name for name, module in decoder.named_modules() if isinstance(module, torch.nn.Linear)}
    float_means: dict[torch.nn.Module, torch.Tensor] = {}
    groups: dict[torch.nn.Module, list[torch.nn.Module]] = {}  # each layer's group: layers of one input
    last: list = [None, None, None]  # the last input the first pass saw, its group and its mean
    loaded: dict[torch.nn.Parameter, torch.Tensor] = {}  # a float layer's tensors as loaded
    # A group's chosen weights and its mean dequantized input, by layer, until each is replaced.
    chosen: dict[torch.nn.Module, tuple] = {}

    def measure(linear, args):
        x = args[0]
        if last[0] is not x:  # a new input: its mean once for its whole group
            last[:] = [x, [], x.reshape(-1, x.shape[-1]).double().mean(0)]
        last[1].append(linear)
        groups[linear], float_means[linear] = last[1], last[2]

    def quantize(linear, x):
        if linear not in chosen:
            rows = x.reshape(-1, x.shape[-1])
            codes, scales = quantize_activation(rows)
            dequantized_mean = dequantize_activation(codes, scales).mean(0)
            group = groups[linear]
            weights = gptq_weights([layer.weight for layer in group], gptq_factor(rows, GPTQ_DAMPING), weight_max)
            chosen.update((layer, (weight, dequantized_mean)) for layer, weight in zip(group, weights))
        weight, dequantized_mean = chosen.pop(linear)
        del groups[linear]
        layer = Int8Linear(linear, weight_max, keep_codes, (float_means.pop(linear), dequantized_mean), weight)
        # Popped (and out of `groups`): the float layer is freed once replaced.
        _replace_submodule(decoder, names.pop(linear), layer)
        return layer(x)

    def enter(layer, args, kwargs):
        # Its norms for good (the linear layers are replaced as they run).
        for module in layer.modules():
            if not isinstance(module, torch.nn.Linear):
                for param in module.parameters(recurse=False):
                    param.data = param.data.float()
        return _to_float32(args), _to_float32(kwargs)

    def enter_float(layer, args, kwargs):
        for param in layer.parameters():
            loaded[param], param.data = param.data, param.data.float()
        return _to_float32(args), _to_float32(kwargs)

    def leave_float(layer, args, kwargs, output):
        # The loaded tensors themselves put back (not a new cast: they may be mapped from the
        # checkpoint's file, and a copy would hold the layer twice): one float32 layer at a time.
        for param in layer.parameters():
            param.data = loaded.pop(param)
        release(layer, args, kwargs, output)

    def release(layer, args, kwargs, output):
        # A layer's freed float32 copies and activations handed back to the system: glibc kept
        # them otherwise, and the load's resident memory grew by 30-80 MB a layer.
        release_freed_memory()

    def run(enter_layer, leave_layer=None, hook_linear=None) -> None:
        handles = [linear.register_forward_pre_hook(hook_linear) for linear in names] if hook_linear else []
        for layer in decoder.layers:
            handles.append(layer.register_forward_pre_hook(enter_layer, with_kwargs=True))
            if leave_layer is not None:
                handles.append(layer.register_forward_hook(leave_layer, with_kwargs=True))
        attention = decoder.config._attn_implementation
        decoder.set_attn_implementation(ATTENTION_NAME)
        try:
            # Embeddings passed in float32, so that the rotary tables are computed in float32 too.
            embeddings = decoder.get_input_embeddings()(ids).float()
            layout = Segments(segments, [None] * len(segments))
            positions = torch.from_numpy(layout.position_array())[None]
            decoder(inputs_embeds=embeddings, position_ids=positions, attention_mask={"full_attention": layout},
                    use_cache=False)
        finally:
            decoder.set_attn_implementation(attention)
            for handle in handles:
                handle.remove()

    run(enter_float, leave_float, hook_linear=measure)
    last.clear()
    # Each float layer stands in a _Calibrating wrapper that replaces it on its first call, so
    # that pass 2 runs no float product.
    for linear, name in list(names.items()):
        _replace_submodule(decoder, name, _Calibrating(linear, quantize))
    run(enter, release)


class _Calibrating(torch.nn.Module):
    """A float linear layer waiting in :func:`_quantize_calibrated`'s second pass: its first call
    hands the layer and its input to ``quantize``, which replaces this wrapper by the int8 layer
    and returns that layer's output."""

    def __init__(self, linear: torch.nn.Linear, quantize):
        super().__init__()
        self.linear = linear
        self.quantize = quantize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.linear, x)


def quantize_fp8(module: torch.nn.Module) -> int:
    """Quantize every ``nn.Linear`` inside ``module`` to fp8 with torchao (per-row scales), in place.

    The layers stay ``nn.Linear`` with torchao's float8 weight tensors, so fixed-row tiles
    (:mod:`rerank_core.invariant`) can still wrap them.

    Returns:
        the number of layers quantized.
    """
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    count = sum(isinstance(m, torch.nn.Linear) for m in module.modules())
    quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda m, _: isinstance(m, torch.nn.Linear))
    return count


def quantize_decoder(decoder: torch.nn.Module, quantization: str, device: torch.device, tokenizer=None) -> int:
    """Quantize the decoder's linear layers for ``quantization`` on ``device``, in place; int8
    with bias correction where ``tokenizer`` is given (:func:`calibration_batch`).

    Raises:
        QuantizedDtypeError: see :func:`check_device`.
    """
    check_device(quantization, device)
    if quantization == "int8":
        return quantize_int8(decoder, calibration=None if tokenizer is None else calibration_batch(tokenizer))
    return quantize_fp8(decoder)


def cast_around_embeddings(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s floating parameters and buffers to ``dtype``, in place, except its
    embedding tables (the input one, and the output one where it is not tied), which keep the
    dtype they were loaded in; lookups in the input table are cast to ``dtype`` as they leave it.

    For a quantized model whose other layers compute in float32: the tables are the largest
    float weights left (0.3 GB of the 0.6B shape's in bf16, 1.2 GB each of the 8B's), a float32
    copy doubles them, and converting them at load was its largest transient (docs/quantized.md,
    "Memory"). A bf16 value cast to float32 is exact, so the scores are those of float32 tables.
    """
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    kept = {id(embedding.weight)} | ({id(output.weight)} if output is not None else set())
    if embedding.weight.dtype != dtype:
        embedding.register_forward_hook(lambda module, args, out: out.to(dtype))
    for module in model.modules():
        for _, param in module.named_parameters(recurse=False):
            if id(param) not in kept and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and buffer.dtype != dtype:
                module._buffers[name] = buffer.to(dtype)


def compute_dtype(backbone: torch.nn.Module) -> torch.dtype:
    """The float dtype ``backbone`` (a decoder) computes in: its last floating parameter's (the
    final norm's), not its first, the embedding table, which :func:`cast_around_embeddings` may
    leave in the load dtype."""
    return [p for p in backbone.parameters() if p.is_floating_point()][-1].dtype


def quantized(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds int8 layers (:func:`quantize_int8` ran on it)."""
    return any(isinstance(m, Int8Linear) for m in module.modules())
