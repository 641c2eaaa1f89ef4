"""Quantized scoring against float32 and bfloat16: speed, ranking fidelity and peak memory (CPU).

Run from the repository root:

    python bench/quantized.py                        # everything, on the 0.6B-shaped checkpoint
    python bench/quantized.py --steps fidelity --checkpoint /tmp/tiny-reranker --queries 64
    python bench/quantized.py --quick                # smoke run (the suite runs it on the tiny checkpoint)
    python bench/quantized.py --json out.json

The checkpoint defaults to bench/engine.py's random checkpoint of the exact Qwen3-Reranker-0.6B
shape (built once into ``~/.cache/qwen3-rerank-serve/bench-0.6b``), in its bf16 copy
(``bench-0.6b-bf16``, as the models are released), so speed and memory are the real model's. Fidelity figures on random weights are not the released model's fidelity; they
compare dtypes with each other on the same weights, which is what a user choosing one needs.

Steps (``--steps``, comma-separated; all by default):

* ``speed``: one query and 16 documents of 30..300 words (bench/engine.py's workload A), scored
  by one engine per dtype (``--speed-dtypes``, default float32 and int8: the fast float path of an
  AVX2 CPU against int8; name bfloat16 too where the CPU multiplies it natively, and
  ``int8-eager-quantize`` for int8 with its activation quantization eager, not compiled). One warm-up
  each, then ``--rounds`` rounds in which every engine scores once, the order rotating each round.
  Reported: median pairs/s per dtype and each dtype's ratio to the first.
* ``breakdown``: where one call's time goes (``--speed-docs`` documents of workload A, torch
  profiler, after a warm-up), float32 against int8: the linear products (``aten::linear`` in
  float32; ``Int8Linear``'s labelled product in int8), int8's activation quantization and rescale,
  attention, and the rest (norms, RoPE, SwiGLU, copies), which int8 leaves in float. From these,
  ``ceiling``: int8's speed-up over float32 if quantizing and rescaling cost nothing (float32's
  call over int8's products plus float32's non-product time), the most its products allow.
* ``fidelity``: ``--queries`` queries x ``--docs`` documents (seeded random words, 20..120 words,
  seeded query words), scored by float32 (the reference) and each other dtype (``--fidelity-dtypes``,
  default bfloat16, int8 and int8-w8: int8 with 8-bit weights emulated in float32, what a VNNI or
  AMX CPU computes, for a CPU whose own int8 products need 7-bit weights; ``PART_VARIANTS`` take
  int8's error apart: weights only, activations only, clipped weight scales, int8 without its
  calibration, int8 with its bias correction but nearest rounding instead of GPTQ's). Per dtype against float32: the largest and the 99th-percentile
  |score difference| over all pairs, the mean signed difference (its score minus float32's: a
  shift), the mean and the lowest Kendall tau-b of a query's ranking,
  and the top-3 agreement (share of each query's float32 top 3 that the dtype also puts in its top
  3, averaged over queries).
* ``kernels``: one 0.6B MLP product (2048 rows, 1024 -> 3072) by each int8 kernel torch offers
  here against fp32: this engine's ``Int8Linear`` (oneDNN), torch's fbgemm/x86 dynamic linear
  (per-tensor activations) and, when installed, torchao's int8 config in eager mode. Median ms
  and the largest |output - fp32 output|.
* ``memory``: 64 documents of ~400 words scored in a fresh subprocess per dtype (float32, int8):
  its peak resident set (VmHWM, loading included) and the bytes of the decoder's weights.

The issue's targets (issue 27; bench, not tests): int8 >= 1.8x float32 pairs/s on an AVX2-only
CPU (>= 1.5x bfloat16 on an AMX CPU); int8's Kendall tau no more than 0.05 below bfloat16's and
its largest |diff| no more than 2x bfloat16's; int8's peak memory >= 30 % below float32's.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import (  # noqa: E402
    DEFAULT_CHECKPOINT,
    QUERY,
    WORDS,
    ensure_bf16_copy,
    ensure_checkpoint,
    make_document,
    workload_a,
    workload_memory,
)

from bench.hardware import describe, summary  # noqa: E402
from rerank_core import Reranker  # noqa: E402
from rerank_core.invariant import _replace_submodule  # noqa: E402
from rerank_core.quantized import (  # noqa: E402
    CODE_OFFSET,
    Int8Linear,
    dequantize_activation,
    fused_quantize,
    int8_weight_max,
    quantize_activation,
    quantize_weight,
    weight_scales,
)

STEPS = ("speed", "breakdown", "fidelity", "memory", "kernels")


# Fidelity measures ------------------------------------------------------------------------------


def kendall_tau_b(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b of two score lists over the same items (ties counted as tau-b does).

    1.0: the same order; -1.0: reversed. Two constant lists give 1.0 (nothing to disagree on).
    """
    if len(a) != len(b):
        raise ValueError("score lists of different lengths")
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = ((concordant + discordant + ties_a) * (concordant + discordant + ties_b)) ** 0.5
    return 1.0 if denominator == 0 else (concordant - discordant) / denominator


def top_k(scores: list[float], k: int) -> set[int]:
    """Indices of the ``k`` highest scores (ties by lower index, as the service ranks)."""
    return set(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between closest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def fidelity(reference: list[list[float]], other: list[list[float]], k: int = 3) -> dict:
    """How far ``other``'s scores and rankings are from ``reference``'s, per query lists of scores."""
    signed = [y - x for ref, oth in zip(reference, other, strict=True) for x, y in zip(ref, oth, strict=True)]
    diffs = [abs(d) for d in signed]
    taus = [kendall_tau_b(ref, oth) for ref, oth in zip(reference, other)]
    agreement = [len(top_k(ref, k) & top_k(oth, k)) / min(k, len(ref)) for ref, oth in zip(reference, other)]
    return {
        "mean_diff": statistics.fmean(signed),
        "max_abs_diff": max(diffs),
        "p99_abs_diff": percentile(diffs, 99),
        "mean_kendall_tau": statistics.fmean(taus),
        "min_kendall_tau": min(taus),
        f"top{k}_agreement": statistics.fmean(agreement),
        "pairs": len(diffs),
        "queries": len(reference),
    }


def fidelity_cases(queries: int, docs: int, seed: int = 7) -> list[tuple[str, list[str]]]:
    """``queries`` seeded (query, documents) cases, documents of 20..120 words."""
    rng = random.Random(seed)
    cases = []
    for _ in range(queries):
        query = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        cases.append((query, [make_document(rng, rng.randint(20, 120)) for _ in range(docs)]))
    return cases


# Steps ------------------------------------------------------------------------------------------


# Emulated int8: Int8Linear's arithmetic at a chosen weight width, whatever this CPU's int8
# products can do exactly. "int8-w8" is what a VNNI or AMX CPU computes (8-bit weights), measured
# on a CPU that must use 7 bits; "int8-w7" is the 7-bit width (the tests check that the emulation
# at this CPU's width reproduces the int8 engine).
EMULATED_WEIGHT_MAX = {"int8-w8": 127, "int8-w7": 63}


class EmulatedInt8Linear(Int8Linear):
    """:class:`rerank_core.quantized.Int8Linear` (its codes, scales and bias correction) with the
    codes multiplied in float32: integer sums, exact while they stay below 2^24, and within
    float32 rounding beyond; so any weight width runs on any CPU."""

    def __init__(self, linear: torch.nn.Linear, weight_max: int, keep_codes: bool = True, input_means=None,
                 weight=None):
        super().__init__(linear, weight_max, True, input_means, weight)
        self.codes = self.weight_codes.float().t().contiguous()
        self.weight_codes = self.weight_packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scales = quantize_activation(x.reshape(-1, self.in_features))
        out = (codes.float() - CODE_OFFSET) @ self.codes
        out.mul_(scales).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def load_emulated(checkpoint: Path, weight_max: int) -> Reranker:
    """The int8 engine (bias correction included) with ``weight_max``-wide weights and
    :class:`EmulatedInt8Linear` products."""
    import rerank_core.quantized as quantized_module

    # quantize_int8 reads both names from its module when it builds the layers.
    with mock.patch.object(quantized_module, "int8_weight_max", lambda: weight_max), \
            mock.patch.object(quantized_module, "Int8Linear", EmulatedInt8Linear):
        return Reranker.load(str(checkpoint), device="cpu", dtype="int8")


# Where int8's error comes from: one part of its arithmetic at a time on the float32 engine.
# "float32-w7"/"float32-w8": each weight replaced by its dequantized 7-/8-bit codes, activations
# float; "float32-a8": each linear layer's input replaced by its dequantized per-token codes,
# weights float. "int8-clip": the int8 engine with weight scales clipped (:func:`clipped_weight`).
# "int8-uncorrected": the int8 engine without its calibration (weights rounded to the nearest
# code, no bias correction); "int8-nearest": with the bias correction but nearest rounding, not
# GPTQ's (rerank_core.quantized).
PART_VARIANTS = ("float32-w7", "float32-w8", "float32-a8", "int8-clip", "int8-uncorrected", "int8-nearest")
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(17))  # 1.0 down to 0.6 of a channel's largest weight


class ActivationQuantized(torch.nn.Module):
    """A float linear layer whose input is first replaced by its dequantized per-token int8 codes."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scales = quantize_activation(x.reshape(-1, x.shape[-1]))
        return self.linear(dequantize_activation(codes, scales, x.dtype).reshape(x.shape))


def clipped_weight(weight: torch.Tensor, weight_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rerank_core.quantized.quantize_weight` with each channel's scale chosen among
    :data:`CLIP_RATIOS` of its largest weight to minimise the channel's squared rounding error
    (weights beyond the clip saturate)."""
    w = weight.detach().float()
    largest_scale = weight_scales(w, weight_max)  # ratio 1.0: the largest weight's scale
    best_error, best_scale = torch.full_like(largest_scale, float("inf")), largest_scale
    for ratio in CLIP_RATIOS:
        scale = largest_scale * ratio
        error = ((torch.round(w / scale[:, None]).clamp_(-weight_max, weight_max) * scale[:, None] - w) ** 2).sum(1)
        better = error < best_error
        best_error, best_scale = torch.where(better, error, best_error), torch.where(better, scale, best_scale)
    codes = torch.round(w / best_scale[:, None]).clamp_(-weight_max, weight_max).to(torch.int8)
    return codes, best_scale


def load_part_variant(checkpoint: Path, variant: str) -> Reranker:
    """An engine of one of :data:`PART_VARIANTS`."""
    import rerank_core.quantized as quantized_module

    if variant in ("int8-uncorrected", "int8-clip", "int8-nearest"):
        # No calibration batch: nearest rounding, no bias correction; clipped_weight: Int8Linear
        # reads quantize_weight from its module at construction (uncalibrated, as int8-clip was
        # measured); nearest: the calibrated pass's GPTQ step replaced by quantize_weight.
        replacements = {
            "int8-uncorrected": {"calibration_batch": lambda tokenizer: None},
            "int8-clip": {"calibration_batch": lambda tokenizer: None, "quantize_weight": clipped_weight},
            "int8-nearest": {"gptq_factor": lambda inputs, damping=None: None,
                             "gptq_weights": lambda weights, factor, weight_max: [
                                 quantize_weight(weight, weight_max) for weight in weights]},
        }[variant]
        with mock.patch.multiple(quantized_module, **replacements):
            return Reranker.load(str(checkpoint), device="cpu", dtype="int8")
    engine = Reranker.load(str(checkpoint), device="cpu", dtype="float32")
    decoder = engine.scorer.backbone
    for name, linear in [(n, m) for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)]:
        if variant == "float32-a8":
            _replace_submodule(decoder, name, ActivationQuantized(linear))
        else:
            codes, scales = quantize_weight(linear.weight, {"float32-w7": 63, "float32-w8": 127}[variant])
            linear.weight.data = codes.float() * scales[:, None]
    return engine


class EagerQuantizeEngine:
    """An int8 engine whose calls quantize activations eagerly: the compiled quantization's
    before figure (``int8-eager-quantize``), alternated with ``int8`` in one process."""

    def __init__(self, engine: Reranker):
        self.engine = engine
        self.scorer = engine.scorer

    def score(self, *args, **kwargs):
        saved, fused_quantize.failure = fused_quantize.failure, "eager for the bench"
        try:
            return self.engine.score(*args, **kwargs)
        finally:
            fused_quantize.failure = saved


def load(checkpoint: Path, dtype: str):
    """An engine of ``dtype`` (a float or quantized dtype, ``int8-eager-quantize``, or a key of
    :data:`EMULATED_WEIGHT_MAX`)."""
    if dtype in PART_VARIANTS:
        return load_part_variant(checkpoint, dtype)
    if dtype == "int8-eager-quantize":
        return EagerQuantizeEngine(Reranker.load(str(checkpoint), device="cpu", dtype="int8"))
    if dtype not in EMULATED_WEIGHT_MAX:
        return Reranker.load(str(checkpoint), device="cpu", dtype=dtype)
    return load_emulated(checkpoint, EMULATED_WEIGHT_MAX[dtype])


def step_speed(checkpoint: Path, dtypes: list[str], rounds: int, docs: int) -> dict:
    documents = workload_a(count=docs)
    engines = {dtype: load(checkpoint, dtype) for dtype in dtypes}
    for engine in engines.values():
        engine.score(QUERY, documents)  # warm-up
    times: dict[str, list[float]] = {dtype: [] for dtype in dtypes}
    for r in range(rounds):
        order = dtypes[r % len(dtypes):] + dtypes[: r % len(dtypes)]
        for dtype in order:
            t0 = time.perf_counter()
            engines[dtype].score(QUERY, documents)
            times[dtype].append(time.perf_counter() - t0)
    first = dtypes[0]
    out = {"documents": docs, "rounds": rounds, "dtypes": {}}
    for dtype in dtypes:
        median = statistics.median(times[dtype])
        out["dtypes"][dtype] = {
            "median_seconds": median,
            "pairs_per_second": docs / median,
            "seconds": times[dtype],
            f"vs_{first}": statistics.median(times[first]) / median,
        }
    return out


def step_breakdown(checkpoint: Path, docs: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    documents = workload_a(count=docs)
    labels = {"float32": {"products": "aten::linear"},
              "int8": {"products": "int8.product", "quantize": "int8.quantize", "rescale": "int8.rescale"}}
    out: dict = {"documents": docs, "dtypes": {}}
    for dtype, parts in labels.items():
        engine = load(checkpoint, dtype)
        engine.score(QUERY, documents)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            engine.score(QUERY, documents)
            wall = time.perf_counter() - t0
        # Inclusive times of the calling thread, in seconds (the profiler's are microseconds).
        inclusive = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages()}
        seconds = {part: inclusive.get(label, 0.0) for part, label in parts.items()}
        seconds["attention"] = inclusive.get("aten::scaled_dot_product_attention", 0.0)
        seconds["rest"] = wall - sum(seconds.values())
        out["dtypes"][dtype] = {"seconds": wall, "parts": seconds,
                                "shares": {part: s / wall for part, s in seconds.items()}}
        del engine
    fp32, int8 = out["dtypes"]["float32"], out["dtypes"]["int8"]
    out["product_speedup"] = fp32["parts"]["products"] / int8["parts"]["products"]
    out["ceiling"] = fp32["seconds"] / (int8["parts"]["products"] + fp32["seconds"] - fp32["parts"]["products"])
    out["int8_vs_float32"] = fp32["seconds"] / int8["seconds"]
    return out


def step_fidelity(checkpoint: Path, dtypes: list[str], queries: int, docs: int) -> dict:
    cases = fidelity_cases(queries, docs)

    def scores(dtype: str) -> list[list[float]]:
        engine = load(checkpoint, dtype)
        return [engine.score(query, documents) for query, documents in cases]

    reference = scores("float32")
    return {"reference": "float32", "dtypes": {dtype: fidelity(reference, scores(dtype)) for dtype in dtypes}}


def step_kernels(rows: int = 2048, repeats: int = 7) -> dict:
    import copy
    import warnings

    torch.manual_seed(0)
    linear = torch.nn.Linear(1024, 3072, bias=False)
    x = torch.randn(rows, 1024)
    kernels = {"float32": linear, f"int8 oneDNN (Int8Linear, weights |q| <= {int8_weight_max()})":
               Int8Linear(linear, int8_weight_max())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation
        try:
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            torch.backends.quantized.engine = "x86"
            kernels["int8 fbgemm/x86 dynamic (per-tensor activations)"] = quantize_dynamic(
                torch.nn.Sequential(copy.deepcopy(linear)), {torch.nn.Linear: per_channel_dynamic_qconfig})
        except (ImportError, RuntimeError) as e:
            print(f"kernels: torch's dynamic int8 linear unavailable ({e})", flush=True)
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            module = torch.nn.Sequential(copy.deepcopy(linear))
            quantize_(module, Int8DynamicActivationInt8WeightConfig())
            kernels["int8 torchao eager (torch._int_mm)"] = module
        except ImportError:
            pass
    out = {}
    with torch.inference_mode():
        reference = linear(x)
        for name, module in kernels.items():
            y = module(x)
            module(x)
            times = []
            for _ in range(repeats if "torchao" not in name else 2):
                t0 = time.perf_counter()
                module(x)
                times.append(time.perf_counter() - t0)
            out[name] = {"ms": 1e3 * statistics.median(times), "max_abs_diff_vs_fp32": float((y - reference).abs().max())}
    return out


def memory_child(checkpoint: str, dtype: str, docs: int, words: int) -> None:
    """In a fresh interpreter: load, score the memory workload, print one JSON line."""
    from engine import _status_kib, weight_bytes

    documents = workload_memory(count=docs, words=words)
    engine = load(Path(checkpoint), dtype)
    load_peak = _status_kib("VmHWM")
    t0 = time.perf_counter()
    engine.score(QUERY, documents)
    seconds = time.perf_counter() - t0
    decoder = engine.scorer.backbone
    quantized = sum(m.weight_packed.nbytes + m.weight_scale.nbytes
                    for m in decoder.modules() if hasattr(m, "weight_packed"))
    print("MEMORY_JSON " + json.dumps({
        "dtype": dtype, "documents": docs, "words": words, "score_seconds": seconds,
        "peak_rss_load_bytes": load_peak * 1024, "peak_rss_bytes": _status_kib("VmHWM") * 1024,
        "float_weights_bytes": weight_bytes(decoder), "int8_weights_bytes": quantized,
    }), flush=True)


def step_memory(checkpoint: Path, dtypes: list[str], docs: int, words: int) -> dict:
    out = {}
    for dtype in dtypes:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--_memory-child", str(checkpoint), dtype,
             str(docs), str(words)], cwd=ROOT, capture_output=True, text=True,
        )
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
            raise RuntimeError(f"memory subprocess for {dtype} failed with exit code {proc.returncode}")
        line = next(l for l in proc.stdout.splitlines() if l.startswith("MEMORY_JSON "))
        out[dtype] = json.loads(line[len("MEMORY_JSON "):])
    if "float32" in out:
        for result in out.values():
            result["peak_vs_float32"] = result["peak_rss_bytes"] / out["float32"]["peak_rss_bytes"]
    return out


# Main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_memory-child"]:
        memory_child(argv[1], argv[2], int(argv[3]), int(argv[4]))
        return 0
    parser = argparse.ArgumentParser(prog="python bench/quantized.py", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help=f"checkpoint directory (default: {DEFAULT_CHECKPOINT}, built there if missing)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    parser.add_argument("--speed-dtypes", default="float32,int8")
    parser.add_argument("--fidelity-dtypes", default="bfloat16,int8,int8-w8",
                        help=f"float or quantized dtypes, the emulated {', '.join(EMULATED_WEIGHT_MAX)}, "
                        f"or one part of int8's error: {', '.join(PART_VARIANTS)}")
    parser.add_argument("--memory-dtypes", default="float32,int8")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the speed step")
    parser.add_argument("--speed-docs", type=int, default=16)
    parser.add_argument("--queries", type=int, default=64, help="queries of the fidelity step")
    parser.add_argument("--docs", type=int, default=16, help="documents per query of the fidelity step")
    parser.add_argument("--memory-docs", type=int, default=64)
    parser.add_argument("--memory-words", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="1 round, 4 queries x 8 documents, 8 memory documents")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.queries, args.docs, args.memory_docs, args.speed_docs = 1, 4, 8, 8, 8
    steps = [s for s in args.steps.split(",") if s]
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps: {', '.join(sorted(unknown))}")
    checkpoint = args.checkpoint
    if checkpoint == DEFAULT_CHECKPOINT:
        # Its bf16 copy: the released checkpoints are bf16 files, so that is what every dtype
        # loads (the fp32 engine upcasts them; int8 quantizes them). Loading the fp32 files would
        # also keep their pages resident in a bf16 load, which a released checkpoint never costs.
        checkpoint = ensure_bf16_copy(ensure_checkpoint(checkpoint)[0])
    hardware = describe()
    print(summary(hardware), flush=True)
    results: dict = {"hardware": hardware, "checkpoint": str(checkpoint)}
    if "speed" in steps:
        results["speed"] = speed = step_speed(checkpoint, args.speed_dtypes.split(","), args.rounds, args.speed_docs)
        for dtype, r in speed["dtypes"].items():
            ratio = next(v for k, v in r.items() if k.startswith("vs_"))
            print(f"speed {dtype:9s} {r['pairs_per_second']:.3f} pairs/s  x{ratio:.2f}", flush=True)
    if "breakdown" in steps:
        results["breakdown"] = bd = step_breakdown(checkpoint, args.speed_docs)
        for dtype, r in bd["dtypes"].items():
            parts = "  ".join(f"{part} {s:.2f} s ({r['shares'][part]:.0%})" for part, s in r["parts"].items())
            print(f"breakdown {dtype:9s} {r['seconds']:.2f} s: {parts}", flush=True)
        print(f"breakdown int8 products x{bd['product_speedup']:.2f} float32's; whole call x{bd['int8_vs_float32']:.2f}; "
              f"ceiling with free quantization x{bd['ceiling']:.2f}", flush=True)
    if "fidelity" in steps:
        results["fidelity"] = fid = step_fidelity(checkpoint, args.fidelity_dtypes.split(","), args.queries, args.docs)
        for dtype, r in fid["dtypes"].items():
            print(f"fidelity {dtype:9s} shift {r['mean_diff']:+.4f}  max {r['max_abs_diff']:.5f}  p99 {r['p99_abs_diff']:.5f}  "
                  f"tau mean {r['mean_kendall_tau']:.4f} min {r['min_kendall_tau']:.4f}  "
                  f"top3 {r['top3_agreement']:.3f}  ({r['queries']} x {r['pairs'] // r['queries']})", flush=True)
    if "kernels" in steps:
        results["kernels"] = kernels = step_kernels()
        for name, r in kernels.items():
            print(f"kernel {name}: {r['ms']:.1f} ms, max |diff| {r['max_abs_diff_vs_fp32']:.4f}", flush=True)
    if "memory" in steps:
        results["memory"] = mem = step_memory(checkpoint, args.memory_dtypes.split(","), args.memory_docs,
                                              args.memory_words)
        for dtype, r in mem.items():
            print(f"memory {dtype:9s} peak {r['peak_rss_bytes'] / 2**30:.2f} GiB (load {r['peak_rss_load_bytes'] / 2**30:.2f})"
                  f"  x{r.get('peak_vs_float32', 1):.2f}  {r['documents']} docs in {r['score_seconds']:.1f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
