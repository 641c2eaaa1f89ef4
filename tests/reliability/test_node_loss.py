"""A worker node lost under load: the service recovers on its own (see node_loss_scenario.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.reliability.conftest import report

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
    # Requests in flight on the lost node are retried on the other one; a few may still fail
    # while the node's death is being detected, never more than a small share.
    assert figures["failed"] <= max(2, figures["requests"] // 10), figures
