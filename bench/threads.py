"""Benchmark: the engine scored from the thread that loaded it, from another thread, or on a
ComputeThread (rerank_core.compute_thread).

Run from the repository root:

    python bench/threads.py                      # bf16 where the CPU has it, 3 rounds
    python bench/threads.py --dtype float32 --rounds 5

Each round runs every mode in a fresh process (a thread that ran torch work leaves its OpenMP
workers behind for the rest of the process), on the same query rows of ``--docs`` documents of
30..300 words (bench/serve.py's workload), after one warm-up row. Modes:

* ``main``: load and score on the main thread (a plain script; ``rerank run``; bench/engine.py).
* ``split``: load on the main thread, score on another (the Serve replica before it had a compute
  thread: ``asyncio.to_thread``; a Ray Data actor's UDF thread).
* ``compute``: load and score on one :class:`~rerank_core.compute_thread.ComputeThread`, called
  from other threads (the replica and the batch actor now).

Reports pairs/s per mode (median over rounds), the CPU use of the process while scoring, and each
mode's ratio to ``main``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("main", "split", "compute")


def child(mode: str, checkpoint: str, dtype: str, queries: int, docs: int) -> dict:
    """One mode in this process; returns pairs/s and CPU use while scoring."""
    from bench.serve import make_requests
    from rerank_core import Reranker
    from rerank_core.compute_thread import ComputeThread

    rows = make_requests(queries + 1, docs, seed=0)
    compute = ComputeThread() if mode == "compute" else None

    def on_load_thread(fn, *args):
        return compute.call(fn, *args) if compute else fn(*args)

    engine = on_load_thread(lambda: Reranker.load(checkpoint, device="cpu", dtype=dtype))
    on_load_thread(engine.score, rows[0]["query"], rows[0]["documents"])  # warm-up (and compile)

    def work() -> dict:
        started, cpu = time.perf_counter(), os.times()
        for row in rows[1:]:
            on_load_thread(engine.score, row["query"], row["documents"])
        seconds, cpu_end = time.perf_counter() - started, os.times()
        used = cpu_end.user + cpu_end.system - cpu.user - cpu.system
        return {"pairs_per_s": queries * docs / seconds, "cpu_percent": 100 * used / seconds}

    if mode == "main":
        return work()
    result: list[dict] = []
    caller = threading.Thread(target=lambda: result.append(work()))
    caller.start()
    caller.join()
    return result[0]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="model directory (default: a cached 0.6B-shaped random one)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--queries", type=int, default=6, help="query rows per mode and round")
    parser.add_argument("--docs", type=int, default=16, help="documents per query row")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        print(json.dumps(child(opts.child, opts.checkpoint, opts.dtype, opts.queries, opts.docs)))
        return {}

    from bench.hardware import describe, summary
    from bench.serve import ensure_checkpoint

    hardware = describe()
    print(summary(hardware), flush=True)
    checkpoint = ensure_checkpoint(opts.checkpoint, False)
    modes = opts.modes.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(opts.rounds):
        for mode in modes:
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--checkpoint", checkpoint, "--dtype", opts.dtype,
                 "--queries", str(opts.queries), "--docs", str(opts.docs)],
                check=True, capture_output=True, text=True,
            ).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1} {mode:8} {runs[mode][-1]['pairs_per_s']:.3f} pairs/s "
                  f"cpu {runs[mode][-1]['cpu_percent']:.0f} %", flush=True)
    figures = {"dtype": opts.dtype, "pairs_per_call": opts.docs, "calls": opts.queries, "rounds": opts.rounds}
    for mode in modes:
        figures[f"{mode}_pairs_per_s"] = statistics.median(x["pairs_per_s"] for x in runs[mode])
        figures[f"{mode}_cpu_percent"] = statistics.median(x["cpu_percent"] for x in runs[mode])
    if "main" in modes:
        for mode in modes:
            ratios = [x["pairs_per_s"] / m["pairs_per_s"] for x, m in zip(runs[mode], runs["main"])]
            figures[f"{mode}_over_main"] = statistics.median(ratios)
    for key, value in figures.items():
        print(f"{key:<24} {value:.3f}" if isinstance(value, float) else f"{key:<24} {value}")
    figures["hardware"] = hardware
    if opts.json:
        Path(opts.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
