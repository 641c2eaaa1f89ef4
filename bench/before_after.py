"""The engine of two checkouts side by side on this CPU: pairs/s before and after a change.

Run from the repository root:

    git worktree add --detach /tmp/before REV
    python bench/before_after.py /tmp/before .          # fp32 (the exact mode)
    python bench/before_after.py /tmp/before . --dtype bfloat16

Each round scores workload A of bench/engine.py (1 query x ``--docs`` documents of 30..300 words)
once per checkout, each in a fresh process that imports that checkout's ``rerank_core``
(bench/host.py's loader, ahead of any installed copy), after one warm-up call; checkouts
alternate in order round by round. Reported: per checkout the median pairs/s and the ratio of
the second to the first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CHILD = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {here!r})
import host
host.load_engine_package(Path({root!r}))
import engine as bench_engine
from rerank_core import EngineConfig, Reranker
checkpoint, _ = bench_engine.ensure_checkpoint(bench_engine.DEFAULT_CHECKPOINT)
reranker = Reranker.load(str(checkpoint), config=EngineConfig(device="cpu", dtype={dtype!r}))
documents = bench_engine.workload_a(count={docs})
reranker.score(bench_engine.QUERY, documents)
start = time.perf_counter()
reranker.score(bench_engine.QUERY, documents)
print(json.dumps({{"seconds": time.perf_counter() - start}}))
"""


def run(root: Path, dtype: str, docs: int) -> float:
    code = CHILD.format(here=str(HERE), root=str(root.resolve()), dtype=dtype, docs=docs)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    return docs / json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path, help="checkout of the 'before' engine")
    parser.add_argument("second", type=Path, help="checkout of the 'after' engine")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from bench.hardware import describe, summary

    info = describe()
    print(summary(info), flush=True)
    rates: dict[str, list[float]] = {"first": [], "second": []}
    for r in range(args.rounds):
        order = ("first", "second") if r % 2 == 0 else ("second", "first")
        for name in order:
            rates[name].append(run(getattr(args, name), args.dtype, args.docs))
            print(f"[round {r + 1}] {name:6s} {getattr(args, name)}: {rates[name][-1]:.3f} pairs/s", flush=True)
    medians = {name: statistics.median(v) for name, v in rates.items()}
    ratio = medians["second"] / medians["first"]
    print(f"{args.dtype}, {args.docs} documents: first {medians['first']:.3f}, second {medians['second']:.3f} "
          f"pairs/s (medians of {args.rounds}); second/first {ratio:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"hardware": info, "dtype": args.dtype, "docs": args.docs, "rates": rates,
                                         "medians": medians, "second_over_first": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
