"""Engine variants side by side, each timed in fresh processes (CPU, workload A).

Run from the repository root:

    python bench/layouts.py                    # packed vs padded passes, 4 rounds
    python bench/layouts.py --rounds 2 --json layouts.json

Why fresh processes: one process that alternates variants carries its heap from one to the next
(glibc returns large freed blocks to the OS or keeps them depending on what ran before), which
moves times by 10-20 % on this workload. Here every sample is its own interpreter: load the
engine, one warm-up call, then ``--calls`` timed calls of workload A (``bench/engine.py``'s 1 query
x 16 documents of 30..300 words); the sample is their median. Rounds alternate the variants,
flipping the order every round; reported are the medians over rounds, each variant's ratio to the
first, its minor page faults per call, and the largest score difference to the first variant.

Variants (``--variants``, comma-separated):

* ``packed``: the CPU default layout (:mod:`rerank_core.packing`), fp32;
* ``packed-variant``: ``packed`` with ``batch_invariant=False`` spelled out (the default since
  batch invariance became an option; before, it was ``packed`` without invariance);
* ``bf16``: ``packed`` in bfloat16 with the CPU defaults (the default dtype on CPUs with AMX or
  AVX512-BF16; decoder layers compiled there, eager on CPUs without native bf16,
  :mod:`rerank_core.compiled`);
* ``bf16-variant``: ``bf16`` with ``batch_invariant=False`` spelled out;
* ``bf16-invariant``: ``bf16`` with batch-invariant linear layers (``batch_invariant=True``);
* ``bf16-eager``: ``bf16`` with transformers' eager decoder layers (``compile_layers=False``);
* ``bf16-tile128``, ``bf16-tile512``: ``bf16-invariant`` with 128 / 512 rows per linear-layer tile
  (default 256);
* ``padded``: ``EngineConfig(packing=False)``, length-sorted padded batches (10 % padding cap);
* ``packed-malloc``: ``packed`` with glibc told to keep freed memory
  (``MALLOC_MMAP_MAX_=0``, ``MALLOC_TRIM_THRESHOLD_``/``MALLOC_TOP_PAD_`` large), which removes
  nearly all page faults. An experiment, not a recommended setting: with ``mmap`` off, torch's
  aligned allocations fragment the heap and a long-running process can grow without bound
  (docs/benchmarks.md, "What is left, measured").
* ``bf16-fresh-pages``, ``bf16-variant-fresh-pages``: ``bf16`` and ``bf16-variant`` with
  ``reuse_freed_memory=False`` (glibc's own malloc settings: fresh pages for every layer's
  activations, :mod:`rerank_core.memory`);
* ``bf16-jemalloc``: ``bf16`` with jemalloc as in ``packed-jemalloc``;
* ``bf16-keepfree``: ``bf16`` with glibc's mmap threshold fixed at its largest (32 MiB) and freed
  heap memory kept (``MALLOC_TRIM_THRESHOLD_`` 2 GiB); blocks over 32 MiB still come from ``mmap``
  and go back on ``free``;
* ``packed-jemalloc``: ``packed`` with jemalloc preloaded (``LD_PRELOAD``; Debian/Ubuntu package
  ``libjemalloc2``) and told to keep freed memory (``MALLOC_CONF`` with decay off), the usual
  advice for CPU inference.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine as bench_engine  # noqa: E402  (bench/engine.py: workload, checkpoint)

JEMALLOC_CONF = "oversize_threshold:1,background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"

VARIANTS = {
    "packed": ({"packing": True}, {}),
    "packed-variant": ({"packing": True, "batch_invariant": False}, {}),
    "bf16": ({"packing": True, "dtype": "bfloat16"}, {}),
    "bf16-variant": ({"packing": True, "dtype": "bfloat16", "batch_invariant": False}, {}),
    "bf16-invariant": ({"packing": True, "dtype": "bfloat16", "batch_invariant": True}, {}),
    "bf16-eager": ({"packing": True, "dtype": "bfloat16", "compile_layers": False}, {}),
    "bf16-tile128": ({"packing": True, "dtype": "bfloat16", "batch_invariant": True, "tile_rows": 128}, {}),
    "bf16-tile512": ({"packing": True, "dtype": "bfloat16", "batch_invariant": True, "tile_rows": 512}, {}),
    "padded": ({"packing": False}, {}),
    "packed-malloc": (
        {"packing": True},
        {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 36), "MALLOC_TOP_PAD_": str(1 << 30)},
    ),
    "packed-jemalloc": ({"packing": True}, {"LD_PRELOAD": "<jemalloc>", "MALLOC_CONF": JEMALLOC_CONF}),
    "bf16-jemalloc": ({"packing": True, "dtype": "bfloat16"}, {"LD_PRELOAD": "<jemalloc>", "MALLOC_CONF": JEMALLOC_CONF}),
    "bf16-fresh-pages": ({"packing": True, "dtype": "bfloat16", "reuse_freed_memory": False}, {}),
    "bf16-variant-fresh-pages": (
        {"packing": True, "dtype": "bfloat16", "batch_invariant": False, "reuse_freed_memory": False},
        {},
    ),
    "bf16-keepfree": (
        {"packing": True, "dtype": "bfloat16"},
        {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 31)},
    ),
}


def variant_env(variant: str) -> dict[str, str]:
    """Environment of a variant's process; ``<jemalloc>`` becomes the library's name."""
    env = dict(VARIANTS[variant][1])
    if env.get("LD_PRELOAD") == "<jemalloc>":
        library = ctypes.util.find_library("jemalloc")
        if library is None:
            raise SystemExit("packed-jemalloc needs jemalloc (e.g. apt-get install libjemalloc2)")
        env["LD_PRELOAD"] = library
    return env


def child(checkpoint: str, variant: str, calls: int) -> None:
    """One sample, in a fresh interpreter: prints ``SAMPLE_JSON {...}``."""
    from rerank_core import EngineConfig, Reranker

    settings = {"dtype": "float32", **VARIANTS[variant][0]}
    engine = Reranker.load(checkpoint, device="cpu", config=EngineConfig(**settings))
    documents = bench_engine.workload_a()
    scores = engine.score(bench_engine.QUERY, documents)  # warm-up
    times, faults = [], []
    for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        engine.score(bench_engine.QUERY, documents)
        times.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print("SAMPLE_JSON " + json.dumps({"seconds": statistics.median(times), "all_seconds": times,
                                       "minor_faults": statistics.median(faults), "scores": scores}), flush=True)


def sample(checkpoint: Path, variant: str, calls: int) -> dict:
    env = {**os.environ, **variant_env(variant)}
    proc = subprocess.run(
        [sys.executable, __file__, "--_child", variant, "--checkpoint", str(checkpoint), "--calls", str(calls)],
        capture_output=True, text=True, env=env, cwd=bench_engine.ROOT,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"variant {variant} failed with exit code {proc.returncode}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("SAMPLE_JSON "))
    return json.loads(line[len("SAMPLE_JSON "):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/layouts.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="packed,padded", help="comma-separated, first is the baseline "
                        f"(from: {', '.join(VARIANTS)}; default packed,padded)")
    parser.add_argument("--rounds", type=int, default=4, help="samples per variant (default 4)")
    parser.add_argument("--calls", type=int, default=2, help="timed calls per sample (default 2)")
    parser.add_argument("--checkpoint", type=Path, default=bench_engine.DEFAULT_CHECKPOINT)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--_child", dest="child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(str(args.checkpoint), args.child, args.calls)
        return 0
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    from bench.hardware import describe, summary  # bench/engine.py put the root on sys.path

    hardware = describe()  # the children run on the same machine
    print(summary(hardware), flush=True)
    checkpoint, _ = bench_engine.ensure_checkpoint(args.checkpoint)
    samples: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            s = sample(checkpoint, v, args.calls)
            samples[v].append(s)
            print(f"round {r + 1}/{args.rounds} {v:14s} {s['seconds']:6.2f} s  {s['minor_faults']:>9.0f} faults/call"
                  f"  load average {os.getloadavg()[0]:.2f}", flush=True)
    base = statistics.median(s["seconds"] for s in samples[variants[0]])
    base_scores = samples[variants[0]][0]["scores"]
    variants_figures = {}
    print(f"\n{'variant':14s} {'median s':>9s} {'vs ' + variants[0]:>12s} {'faults/call':>12s} {'max diff':>9s}")
    for v in variants:
        median = statistics.median(s["seconds"] for s in samples[v])
        faults = statistics.median(s["minor_faults"] for s in samples[v])
        diff = max(abs(a - b) for s in samples[v] for a, b in zip(s["scores"], base_scores))
        variants_figures[v] = {"median_s": median, "speedup_vs_first": base / median, "minor_faults_per_call": faults,
                               "max_abs_score_diff_vs_first": diff, "samples_s": [s["seconds"] for s in samples[v]]}
        print(f"{v:14s} {median:9.2f} {base / median:11.3f}x {faults:12.0f} {diff:9.1e}")
    if args.json:
        args.json.write_text(json.dumps({"variants": variants_figures, "rounds": args.rounds, "calls": args.calls,
                                         "hardware": hardware}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
