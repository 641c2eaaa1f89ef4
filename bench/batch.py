"""Benchmark of ``rerank batch`` (Ray Data) against the engine called directly on the same pairs.

Run from the repository root:

    python bench/batch.py                         # 0.6B-shaped checkpoint (built once), 1 actor
    python bench/batch.py --actors 1 2 --queries 48
    python bench/batch.py --quick                 # smoke run on a tiny checkpoint

The workload is ``--queries`` query rows of ``--docs`` documents of 30..300 words each (the
workload of ``bench/serve.py``), written to a JSONL file. Both sides run on this machine's CPUs
in ``--dtype`` (default float32):

* **batch**: :func:`rerank_batch.rerank_file` on a local Ray instance started here, end to end:
  read, tokenize, score with ``N`` actors of ``cores / N`` CPUs each (as many torch threads),
  write JSONL. The model load in each actor is part of the time, as it is for a user.
* **direct**: ``Reranker.score(query, documents)`` in this process, one query row after another,
  with as many torch threads as one actor has. Reported without and with the model load
  (``Reranker.load``, timed once).

Rounds alternate direct and batch ``--repeats`` times; medians are reported. The figure of merit is
batch pairs/s over direct pairs/s with one actor (the overhead of Ray Data and the separate
processes); with more actors, how it scales where cores allow.

Target (issue 14): batch/direct >= 0.85 with 1 actor on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.hardware import describe, summary  # noqa: E402
from bench.serve import ensure_checkpoint, make_requests, run_direct  # noqa: E402  (the same workload, checkpoint, timing)


def run_batch(source: Path, workdir: Path, checkpoint: str, actors: int, cores: int, dtype: str) -> dict:
    from rerank_batch import ModelOptions, Workers, rerank_file

    output = Path(tempfile.mkdtemp(dir=workdir)) / "out"
    workers = Workers(concurrency=actors, num_cpus=max(1, cores // actors), tokenize_cpus=1)
    started = time.perf_counter()
    rerank_file(str(source), str(output), ModelOptions(checkpoint, device="cpu", dtype=dtype),
                workers=workers, progress=False)
    return {"seconds": time.perf_counter() - started}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="model directory (default: a cached 0.6B-shaped random one)")
    parser.add_argument("--queries", type=int, default=24, help="query rows")
    parser.add_argument("--docs", type=int, default=16, help="documents per query row")
    parser.add_argument("--actors", type=int, nargs="+", default=[1], help="actor counts to measure")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="CPUs shared by the actors")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of direct + batch")
    parser.add_argument("--dtype", default="float32", help="engine dtype on both sides (default float32; "
                        "auto: bf16 on CPUs with AMX or AVX512-BF16)")
    parser.add_argument("--quick", action="store_true", help="tiny checkpoint, few rows, one round")
    parser.add_argument("--json", help="also write the figures to this file")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.queries, opts.repeats = min(opts.queries, 6), 1

    import ray
    import torch

    from rerank_core import Reranker

    checkpoint = ensure_checkpoint(opts.checkpoint, opts.quick)
    rows = make_requests(opts.queries, opts.docs, seed=0)
    pairs = sum(len(r["documents"]) for r in rows)
    workdir = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    source = workdir / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    # One logical CPU beyond the actors' for the read, tokenize and write tasks (see rerank_cli.batch_cmd).
    ray.init(num_cpus=opts.cores + 1, include_dashboard=False, log_to_driver=False)
    torch.set_num_threads(max(1, opts.cores // min(opts.actors)))  # what one actor of the smallest pool gets
    started = time.perf_counter()
    engine = Reranker.load(checkpoint, device="cpu", dtype=opts.dtype)
    load_seconds = time.perf_counter() - started
    engine.score(rows[0]["query"], rows[0]["documents"])  # warm-up
    direct, batch = [], {n: [] for n in opts.actors}
    for _ in range(opts.repeats):
        direct.append(run_direct(engine, rows))
        for n in opts.actors:
            batch[n].append(run_batch(source, workdir, checkpoint, n, opts.cores, opts.dtype))
    ray.shutdown()

    direct_s = statistics.median(r["seconds"] for r in direct)
    figures = {
        "checkpoint": checkpoint,
        "query_rows": opts.queries,
        "pairs": pairs,
        "cores": opts.cores,
        "dtype": opts.dtype,
        "repeats": opts.repeats,
        "torch_threads_direct": torch.get_num_threads(),
        "direct_pairs_per_s": pairs / direct_s,
        "direct_with_load_pairs_per_s": pairs / (direct_s + load_seconds),
        "model_load_s": load_seconds,
    }
    for n, runs in batch.items():
        batch_s = statistics.median(r["seconds"] for r in runs)
        figures[f"batch_{n}_actor_pairs_per_s"] = pairs / batch_s
        figures[f"batch_{n}_actor_over_direct"] = direct_s / batch_s
        figures[f"batch_{n}_actor_over_direct_with_load"] = (direct_s + load_seconds) / batch_s
    hardware = describe()
    print(summary(hardware))
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    figures["hardware"] = hardware
    if 1 in batch:
        ratio = figures["batch_1_actor_over_direct"]
        print(f"target batch/direct >= 0.85 (1 actor): {'met' if ratio >= 0.85 else 'NOT met'}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
