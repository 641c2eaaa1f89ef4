"""The engine under glibc's malloc against tcmalloc and jemalloc, preloaded (CPU).

Run from the repository root:

    python bench/allocator.py                          # float32 and int8, 3 rounds
    python bench/allocator.py --dtypes float32 --rounds 5 --json out.json
    python bench/allocator.py --quick --checkpoint /tmp/tiny-reranker   # smoke run

Why: on CPU every pass allocates activations of tens of MB (tokens x 3072 floats for the MLP of the
0.6B shape). glibc's malloc serves such blocks with fresh ``mmap`` pages and gives them back when
they are freed, so the next pass pays a page fault (and the kernel's zeroing) for every 4 KiB it
touches again. tcmalloc and jemalloc keep freed memory for reuse; torch's own CPU launcher
(``python -m torch.backends.xeon.run_cpu``) preloads one of them for that reason. An allocator
can only be chosen when a process starts (``LD_PRELOAD``), so each measurement is a fresh process.

Each round runs every (allocator, dtype) once, in a fresh process, the allocators' order rotating
each round. A process loads the engine, scores bench/engine.py's workload A (one query and
``--docs`` documents of 30..300 words) once as a warm-up, then ``--calls`` times. Reported per
(allocator, dtype): the median seconds per call over every timed call of every round, its ratio
to glibc's, the median minor page faults per call, and the largest peak resident set (VmHWM).

Allocators (``--allocators``): ``glibc`` (nothing preloaded), ``tcmalloc`` (gperftools'
``libtcmalloc_minimal``), ``jemalloc`` (the copy in Ray's wheel, else the system's, set to keep
freed memory: :data:`ALLOCATORS`). One that is not installed is reported as missing
(Debian/Ubuntu: ``apt install libtcmalloc-minimal4``), not measured.
"""

from __future__ import annotations

import argparse
import ctypes.util
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import DEFAULT_CHECKPOINT, QUERY, ensure_bf16_copy, ensure_checkpoint, workload_a  # noqa: E402

from bench.hardware import describe, summary  # noqa: E402

# name -> (library to find, extra environment). jemalloc's defaults give large blocks back at
# once (a dedicated arena for blocks over 8 MiB) or over 10 s: measured, as many faults as glibc.
# Its settings here keep freed memory for reuse, as tcmalloc does.
ALLOCATORS = {
    "glibc": (None, {}),
    "tcmalloc": ("tcmalloc_minimal", {}),
    "jemalloc": ("jemalloc", {"MALLOC_CONF": "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"}),
}


def ray_jemalloc() -> str | None:
    """The jemalloc library Ray's wheel ships (``ray/core/libjemalloc.so``), found without importing Ray."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "core" / "libjemalloc.so"
    return str(path) if path.is_file() else None


def allocator_env(name: str) -> dict[str, str] | None:
    """The environment that makes a new process use allocator ``name``; None if it is not installed.
    jemalloc is Ray's copy where Ray is installed, else the system's."""
    library, extra = ALLOCATORS[name]
    if library is None:
        return {}
    # A soname the dynamic loader finds (e.g. libtcmalloc_minimal.so.4), or a path.
    found = (name == "jemalloc" and ray_jemalloc()) or ctypes.util.find_library(library)
    if found is None:
        return None
    preload = ":".join(p for p in (found, os.environ.get("LD_PRELOAD", "")) if p)
    return {"LD_PRELOAD": preload, **extra}


def child(checkpoint: str, dtype: str, docs: int, calls: int) -> dict:
    """Load, warm up, time ``calls`` calls; runs inside the measured process."""
    from rerank_core import Reranker

    maps = Path("/proc/self/maps").read_text()
    engine = Reranker.load(checkpoint, device="cpu", dtype=dtype)
    documents = workload_a(count=docs)
    engine.score(QUERY, documents)
    seconds, faults = [], []
    for _ in range(calls):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        engine.score(QUERY, documents)
        seconds.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    loaded = [name for name in ("tcmalloc", "jemalloc") if f"lib{name}" in maps]
    return {"seconds": seconds, "minor_faults": faults, "peak_rss_gib": hwm / 1024**2, "loaded": loaded}


def run_child(checkpoint: Path, dtype: str, docs: int, calls: int, env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", dtype, "--checkpoint", str(checkpoint), "--docs", str(docs),
         "--calls", str(calls)],
        env={**os.environ, **env}, capture_output=True, text=True, check=False, cwd=ROOT,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{dtype} child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(checkpoint: Path, allocators: list[str], dtypes: list[str], rounds: int, docs: int, calls: int) -> dict:
    envs = {name: allocator_env(name) for name in allocators}
    present = [name for name in allocators if envs[name] is not None]
    runs: dict[str, dict[str, list[dict]]] = {name: {dtype: [] for dtype in dtypes} for name in present}
    for r in range(rounds):
        order = present[r % len(present):] + present[: r % len(present)]
        for name in order:
            for dtype in dtypes:
                run = run_child(checkpoint, dtype, docs, calls, envs[name])
                if name != "glibc" and name not in run["loaded"]:
                    raise RuntimeError(f"{name} was preloaded ({envs[name]}) but is not in the process")
                runs[name][dtype].append(run)
    out: dict = {"documents": docs, "rounds": rounds, "calls": calls,
                 "missing": [name for name in allocators if envs[name] is None], "allocators": {}}
    for name in present:
        out["allocators"][name] = {"env": envs[name], "dtypes": {}}
        for dtype in dtypes:
            seconds = [s for run in runs[name][dtype] for s in run["seconds"]]
            faults = [f for run in runs[name][dtype] for f in run["minor_faults"]]
            out["allocators"][name]["dtypes"][dtype] = {
                "median_seconds": statistics.median(seconds),
                "pairs_per_second": docs / statistics.median(seconds),
                "seconds": seconds,
                "median_minor_faults": statistics.median(faults),
                "peak_rss_gib": max(run["peak_rss_gib"] for run in runs[name][dtype]),
            }
    if "glibc" in out["allocators"]:
        for result in out["allocators"].values():
            for dtype, figures in result["dtypes"].items():
                base = out["allocators"]["glibc"]["dtypes"][dtype]["median_seconds"]
                figures["vs_glibc"] = base / figures["median_seconds"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/allocator.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help=f"checkpoint directory (default: the bf16 copy of {DEFAULT_CHECKPOINT}, built if missing)")
    parser.add_argument("--allocators", default=",".join(ALLOCATORS))
    parser.add_argument("--dtypes", default="float32,int8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--docs", type=int, default=16, help="documents of workload A per call")
    parser.add_argument("--calls", type=int, default=2, help="timed calls per process")
    parser.add_argument("--quick", action="store_true", help="1 round, 4 documents, 1 call")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(str(args.checkpoint), args.child, args.docs, args.calls)))
        return 0
    if args.quick:
        args.rounds, args.docs, args.calls = 1, 4, 1
    checkpoint = args.checkpoint or ensure_bf16_copy(ensure_checkpoint(DEFAULT_CHECKPOINT)[0])
    print(summary(), flush=True)
    results = measure(checkpoint, args.allocators.split(","), args.dtypes.split(","), args.rounds, args.docs,
                      args.calls)
    results["hardware"] = describe()
    for name in results["missing"]:
        print(f"{name:9s} not installed: not measured")
    for name, result in results["allocators"].items():
        for dtype, f in result["dtypes"].items():
            print(f"{name:9s} {dtype:8s} {f['median_seconds']:7.2f} s/call  {f['pairs_per_second']:6.3f} pairs/s  "
                  f"{f.get('vs_glibc', float('nan')):5.2f}x glibc  {f['median_minor_faults']:8.0f} faults/call  "
                  f"peak {f['peak_rss_gib']:.2f} GiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
