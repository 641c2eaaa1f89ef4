"""Benchmark of the serving layer: the CPU config under concurrent load vs the engine called directly.

Run from the repository root:

    python bench/serve.py                                # 0.6B-shaped checkpoint (built once)
    python bench/serve.py --checkpoint DIR --clients 8 --requests 48
    python bench/serve.py --quick                        # smoke run on a tiny checkpoint

It starts the application of ``configs/serve-cpu.yaml`` (its args and deployment options, with the
model source replaced by ``--checkpoint``) on a local Ray instance, drives ``POST /rerank`` with
``--clients`` concurrent clients for ``--requests`` requests of one query and ``--docs`` documents
of 30..300 words, and reports requests/s, pairs/s and p50/p99 latency. The same requests are then
scored by the engine directly in this process (``Reranker.score``, one request at a time, with as
many torch threads as the model replica has CPUs), and the ratio served/direct pairs/s is the share
of engine throughput the service keeps. Rounds alternate served and direct ``--repeats`` times;
medians are reported. The serving layer costs ``1 - ratio`` of engine throughput.

Target (issue: deployments): ratio >= 0.8 at saturation on the 0.6B-shaped model.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import socket
import statistics
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


def run_served(url: str, requests_: list[dict], clients: int) -> dict:
    import requests

    def one(body):
        started = time.perf_counter()
        r = requests.post(url, json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - started

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, requests_))
    elapsed = time.perf_counter() - started
    pairs = sum(len(r["documents"]) for r in requests_)
    return {
        "seconds": elapsed,
        "requests_per_s": len(requests_) / elapsed,
        "pairs_per_s": pairs / elapsed,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }


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
    parser.add_argument("--json", help="also write the figures to this file")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.requests, opts.repeats = min(opts.requests, 8), 1

    import ray
    import torch
    from ray import serve

    from deployments.app import build_app
    from deployments.args import AppArgs
    from rerank_core import Reranker

    checkpoint = ensure_checkpoint(opts.checkpoint, opts.quick)
    args, http = load_app_args(Path(opts.config), checkpoint)
    replica_cpus = int(args["models"][0]["deployment"]["ray_actor_options"]["num_cpus"])
    port = _free_port()
    ray.init(num_cpus=max(2, replica_cpus), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs(**args)), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/rerank"

    torch.set_num_threads(replica_cpus)  # the engine gets what the replica gets
    engine = Reranker.load(checkpoint, device="cpu", dtype="float32")
    workload = make_requests(opts.requests, opts.docs, seed=0)
    run_served(url, workload[: max(2, opts.clients)], opts.clients)  # warm-up
    engine.score(workload[0]["query"], workload[0]["documents"])
    served, direct = [], []
    for _ in range(opts.repeats):
        served.append(run_served(url, workload, opts.clients))
        direct.append(run_direct(engine, workload))
    serve.shutdown()
    ray.shutdown()

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    figures = {
        "checkpoint": checkpoint,
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
    }
    figures["served_over_direct"] = figures["served_pairs_per_s"] / figures["direct_pairs_per_s"]
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print(f"target served/direct >= 0.80: {'met' if figures['served_over_direct'] >= 0.8 else 'NOT met'}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(figures, indent=2))
    return figures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
