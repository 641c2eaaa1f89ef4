"""A worker node lost under load: the service recovers on its own (see node_loss_scenario.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.reliability.conftest import report
from tests.reliability.node_loss_scenario import CLIENTS

ROOT = Path(__file__).resolve().parents[2]


def test_service_survives_the_loss_of_a_worker_node(tiny_checkpoint):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.reliability.node_loss_scenario", str(tiny_checkpoint)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    figures = json.loads(lines[-1])
    report("node loss", **figures)
    assert figures["requests_after_node_loss"] > 0
    assert figures["final_status"] == 200
    assert figures["replacement_replica_s"] is not None  # Serve re-placed the lost replica
    if not figures["ingress_on_lost_node"]:
        # Only a model replica was lost: its chunks in flight are sent again to the other one.
        assert figures["failed"] == 0, figures
    else:
        # The ingress replica handling a request died with the node: the Serve proxy answers
        # the requests in flight on it 500 (its own plain-text body; nothing in the application
        # is left to answer). Serve starts a new ingress and later requests succeed.
        assert set(figures["failure_kinds"]) <= {"500: Internal Server Error"}, figures
        assert figures["failed"] <= 2 * CLIENTS, figures
