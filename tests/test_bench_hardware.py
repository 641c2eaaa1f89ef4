"""bench/hardware.py: what every benchmark prints about the machine it ran on."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import hardware  # noqa: E402
from rerank_core.cpu import cpu_features  # noqa: E402

EPYC_CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu avx2

processor\t: 1
model name\t: another CPU
"""


def test_cpuinfo_fields_come_from_the_first_processor():
    assert hardware.cpuinfo_fields(EPYC_CPUINFO) == {
        "vendor_id": "AuthenticAMD", "cpu family": "25", "model": "1", "model name": "AMD EPYC 7B13",
    }
    assert hardware.cpuinfo_fields("Processor : ARMv7\n") == {}


def test_describe_reports_the_features_the_engine_chooses_from():
    info = hardware.describe()
    json.dumps(info)  # JSON-able as it is
    features = cpu_features()
    assert info["cpu"]["isa"] == features.isa
    assert info["cpu"]["native_bf16"] == features.native_bf16
    assert info["cpu"]["cores"] == features.cores
    assert info["cpu"]["model"]
    import torch

    assert info["torch"] == torch.__version__
    assert len(info["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_describe_lists_each_cuda_device(monkeypatch):
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    names = ["NVIDIA H200", "NVIDIA H100 80GB HBM3"]
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name=names[i], total_memory=(140 - 60 * i) * 2**30))
    info = hardware.describe()
    assert info["gpus"] == [{"name": "NVIDIA H200", "memory_gib": 140.0},
                            {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 80.0}]
    assert "GPU NVIDIA H200 (140.0 GiB), GPU NVIDIA H100 80GB HBM3 (80.0 GiB);" in hardware.summary(info)


def test_summary_names_cpu_isa_bf16_and_gpu():
    cpu = {"model": "AMD EPYC", "family": "25", "model_number": "1", "cores": 2, "logical_cpus": 4,
           "isa": "AVX2", "native_bf16": False, "ceiling": None}
    info = {"cpu": cpu, "gpus": [], "torch": "2.13.0+cpu", "torch_threads": 2}
    assert hardware.summary(info) == ("hardware: CPU AMD EPYC (family 25, model 1), 2 cores, 4 logical CPUs, "
                                      "AVX2 (bf16 emulated); no GPU; torch 2.13.0+cpu, 2 threads")
    amx = {**cpu, "model": "Intel(R) Xeon(R) Platinum 8481C", "family": None, "model_number": None,
           "isa": "AMX", "native_bf16": True, "ceiling": "AVX2"}
    gpu = {**info, "cpu": amx, "gpus": [{"name": "NVIDIA H200", "memory_gib": 139.8}]}
    assert hardware.summary(gpu) == ("hardware: CPU Intel(R) Xeon(R) Platinum 8481C, 2 cores, 4 logical CPUs, "
                                     "AMX (bf16 native, capped at AVX2); GPU NVIDIA H200 (139.8 GiB); "
                                     "torch 2.13.0+cpu, 2 threads")
    assert hardware.summary().startswith(f"hardware: CPU {hardware.describe()['cpu']['model']}")


def test_every_bench_script_prints_the_hardware():
    """Each script imports bench.hardware and calls summary() (gpu_steps.py is a module of gpu.py)."""
    missing = []
    for script in sorted((REPO / "bench").glob("*.py")):
        if script.name in ("hardware.py", "gpu_steps.py"):
            continue
        tree = ast.parse(script.read_text())
        imported = {alias.asname or alias.name: alias.name for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module == "bench.hardware" for alias in node.names}
        called = {node.func.id for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        if not any(original == "summary" and local in called for local, original in imported.items()):
            missing.append(script.name)
    assert missing == []
