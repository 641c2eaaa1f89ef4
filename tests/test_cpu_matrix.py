"""Every CPU setting (dtype x batch_invariant x packing x compile_layers) scores or is refused at
load, on this CPU and, on a CPU above AVX2, also as an AVX2-only CPU (``ONEDNN_MAX_CPU_ISA=AVX2``).

The settings run in a process of their own per CPU kind (``tests/cpu_matrix.py``): the ceiling
must reach oneDNN before it starts, and the compilations stay out of this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rerank_core.cpu import cpu_features
from tests.cpu_matrix import DOCS, QUERY, settings
from tests.reference import official_scores
from tests.test_compiled import HAS_COMPILER

# "native": this CPU as it is. "AVX2": the AVX2-only paths, where this CPU has more than AVX2
# (on an AVX2-only CPU that run would be the native one again).
KINDS = {"native": {}}
if cpu_features().isa in ("AMX", "AVX512-BF16", "AVX-512"):
    # oneDNN, torch's own kernels and MKL's, capped alike (as scripts/test-cpu-kind does).
    KINDS["AVX2"] = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# Largest |score - model card's fp32 score| on the tiny checkpoint, by dtype.
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 1e-2}
SETTINGS = list(settings())


def _id(setting: dict) -> str:
    return "-".join(
        [setting["dtype"]] + [name for name in ("batch_invariant", "packing", "compile_layers") if setting[name]]
    )


@pytest.fixture(scope="module", params=list(KINDS))
def results(request, tiny_checkpoint):
    env = {**os.environ, **KINDS[request.param]}
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-m", "tests.cpu_matrix", str(tiny_checkpoint)],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [row["setting"] for row in rows] == SETTINGS
    return request.param, rows


@pytest.fixture(scope="module")
def reference(official_model):
    return official_scores(*official_model, QUERY, DOCS)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SETTINGS)), ids=[_id(s) for s in SETTINGS])
def test_every_cpu_setting_scores_or_is_refused_at_load(results, reference, index):
    kind, rows = results
    row = rows[index]
    setting, cpu = row["setting"], row["cpu"]
    assert "error" not in row, row["error"]
    if kind == "AVX2":
        assert cpu["isa"] == "AVX2" and cpu["ceiling"] == "AVX2" and not cpu["onednn_bf16"]
    needs_packing = [name for name in ("batch_invariant", "compile_layers") if setting[name]]
    if not setting["packing"] and needs_packing:
        assert row["refused"].startswith(f"{needs_packing[0]} needs packed passes (packing=True or None)")
        return
    assert "refused" not in row
    bf16 = setting["dtype"] == "bfloat16"
    assert row["packing"] is setting["packing"]
    assert row["batch_invariant"] is setting["batch_invariant"]
    assert row["compiled"] is (setting["compile_layers"] and HAS_COMPILER)
    if setting["compile_layers"] and HAS_COMPILER:
        assert row["compile_failure"] is None
    # bf16 weights reordered for oneDNN where it has bf16 kernels; plain tiles elsewhere.
    assert row["reordered"] is (setting["batch_invariant"] and bf16 and cpu["onednn_bf16"])
    assert row["key_multiple"] == (32 if bf16 and cpu["amx_bf16"] else 1)
    worst = max(abs(a - b) for a, b in zip(row["scores"], reference))
    assert worst <= TOLERANCE[setting["dtype"]], worst
    if setting["batch_invariant"]:
        assert row["alone"] == row["scores"]  # bit for bit
    else:
        assert max(abs(a - b) for a, b in zip(row["alone"], row["scores"])) <= TOLERANCE[setting["dtype"]]
