"""Node loss, run as its own process (it needs its own multi-node Ray cluster).

    python -m tests.reliability.node_loss_scenario CHECKPOINT_DIR

Starts a head and two worker nodes on this machine with ``ray.cluster_utils.Cluster``, one model
replica per worker node, one ingress replica wherever Ray places it (the proxy is on the head);
drives steady load, removes one worker node, then adds a fresh one. Prints one JSON line with the
figures, including whether the ingress replica was on the removed node.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

import ray
import requests
from ray import serve
from ray.cluster_utils import Cluster

from deployments.app import build_app, model_deployment_name
from tests.service_helpers import app_args

QUERY = "What is the capital of China?"
DOCS = ["The capital of China is Beijing.", "Gravity attracts bodies.", "北京是首都。", "", "Paris is in France."]
CLIENTS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_count(handle, tries=30) -> int:
    return len({handle.actor_name.remote().result(timeout_s=30) for _ in range(tries)})


def main(checkpoint: str) -> dict:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "include_dashboard": False,
            # Notice a dead node within a few seconds, not the default tens of seconds.
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        },
    )
    workers = [cluster.add_node(num_cpus=1, resources={"model_slot": 1}) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
    model = {
        "batching": {"max_batch_size": 64, "batch_wait_timeout_s": 0.2},
        # One replica per worker node: each asks for that node's single model slot.
        "deployment": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0, "resources": {"model_slot": 1}}},
    }
    serve.run(build_app(app_args(checkpoint, model=model)), name="nodes", route_prefix="/")
    handle = serve.get_deployment_handle(model_deployment_name("tiny"), app_name="nodes")
    ingress = serve.get_deployment_handle("RerankIngress", app_name="nodes")
    # One ingress replica, placed by Ray on any node (num_cpus 0): requests in flight on it are
    # lost if it is on the node removed below, whatever the application does.
    ingress_node = ingress.stats.remote().result(timeout_s=30)["node_id"]
    url = f"http://127.0.0.1:{port}/rerank"
    outcomes: list[tuple[float, bool]] = []
    failure_kinds: dict[str, int] = {}
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                r = requests.post(url, json={"query": QUERY, "documents": DOCS}, timeout=60)
                kind = None if r.status_code == 200 else f"{r.status_code}: {r.text[:120]}"
            except requests.RequestException as e:
                kind = type(e).__name__
            if kind is not None:
                failure_kinds[kind] = failure_kinds.get(kind, 0) + 1
            outcomes.append((time.monotonic(), kind is None))

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(4)
    removed_at = time.monotonic()
    ingress_lost = ingress_node == workers[0].node_id
    cluster.remove_node(workers[0], allow_graceful=False)
    time.sleep(8)
    cluster.add_node(num_cpus=1, resources={"model_slot": 1})
    added_at = time.monotonic()
    replicas_back = None
    while time.monotonic() - added_at < 120:
        if _replica_count(handle) == 2:
            replicas_back = time.monotonic() - added_at
            break
        time.sleep(1)
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join(timeout=90)
    after = [ok for at, ok in outcomes if at > removed_at]
    failures = [at for at, ok in outcomes if not ok]
    last_failure = max(failures, default=removed_at)
    final = requests.post(url, json={"query": QUERY, "documents": DOCS}, timeout=60).status_code
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    return {
        "requests": len(outcomes),
        "succeeded": sum(ok for _, ok in outcomes),
        "failed": len(failures),
        "requests_after_node_loss": len(after),
        "recovery_s": round(max(0.0, last_failure - removed_at), 1),
        "replacement_replica_s": None if replicas_back is None else round(replicas_back, 1),
        "final_status": final,
        "failure_kinds": failure_kinds,
        "ingress_on_lost_node": ingress_lost,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])), flush=True)
