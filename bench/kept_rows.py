"""The last layer for the read rows only, against the full last layer, alternated in one process.

Run from the repository root:

    python bench/kept_rows.py                 # bf16 CPU defaults, 16 alternations of workload A
    python bench/kept_rows.py --dtype float32 --alternations 6

Loads the engine once (``bench/engine.py``'s random 0.6B checkpoint, bf16 copy for bf16), then
scores workload A (1 query x 16 fresh documents of 30..300 words) with
``PairScorer.kept_rows_only`` on and off in turn, flipping the order every alternation. One process
on purpose: gains of a few percent drown in the ±5 % that fresh processes move by on this machine,
while paired calls share the machine's state. Printed: each variant's median seconds per call, the
median of the per-alternation ratios, and the largest score difference between the variants.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import engine as bench_engine  # noqa: E402  (bench/engine.py: workload, checkpoint)

from bench.hardware import summary  # noqa: E402
from rerank_core import EngineConfig, Reranker  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=bench_engine.DEFAULT_CHECKPOINT)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--alternations", type=int, default=16)
    args = parser.parse_args(argv)
    print(summary(), flush=True)
    checkpoint, _ = bench_engine.ensure_checkpoint(args.checkpoint)
    if args.dtype == "bfloat16":
        checkpoint = bench_engine.ensure_bf16_copy(checkpoint)
    engine = Reranker.load(str(checkpoint), config=EngineConfig(dtype=args.dtype))
    if not engine.scorer.kept_rows_only:
        print("this engine does not run kept rows (not a CPU packed pass?)", file=sys.stderr)
        return 2
    variants = {"kept rows": True, "full last layer": False}
    for flag in variants.values():  # warm-up, compiling both paths
        engine.scorer.kept_rows_only = flag
        engine.score(bench_engine.QUERY, bench_engine.workload_a())
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    worst = 0.0
    for i in range(args.alternations):
        documents = bench_engine.workload_a(seed=i + 1)
        scores = {}
        for name in list(variants) if i % 2 == 0 else list(variants)[::-1]:
            engine.scorer.kept_rows_only = variants[name]
            start = time.perf_counter()
            scores[name] = engine.score(bench_engine.QUERY, documents)
            seconds[name].append(time.perf_counter() - start)
        worst = max(worst, *(abs(a - b) for a, b in zip(*scores.values())))
    for name, values in seconds.items():
        print(f"{name:15s} median {statistics.median(values):.3f} s per call  ({', '.join(f'{x:.2f}' for x in values)})")
    ratios = [full / kept for kept, full in zip(seconds["kept rows"], seconds["full last layer"])]
    print(f"kept rows speedup, median of per-alternation ratios: {statistics.median(ratios):.3f}x")
    print(f"largest score difference between the variants: {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
