"""The hardware a benchmark ran on, so that every figure it prints can be attributed.

Every bench script prints :func:`summary` before its figures and puts :func:`describe` under
``"hardware"`` in its JSON. A figure is only comparable with figures of the same CPU kind (AMX,
AVX512-BF16, AVX-512, AVX2: ``dtype: auto`` and the engine's other choices differ between them,
``rerank_core.cpu``) or the same GPU model.

    from bench.hardware import describe, summary
    print(summary())                    # one line, e.g. "CPU: AMD EPYC (family 25, model 1), ..."
    report["hardware"] = describe()     # the same, as a JSON-able dict
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from rerank_core.cpu import cpu_features

CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor's ``model name``, ``vendor_id``, ``cpu family`` and ``model`` in
    ``/proc/cpuinfo``'s text (those present; an empty dict for other formats)."""
    wanted = {"model name", "vendor_id", "cpu family", "model"}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the end of the first processor's block
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key in wanted:
            fields[key] = value.strip()
    return fields


def _cpuinfo() -> dict[str, str]:
    try:
        return cpuinfo_fields(CPUINFO.read_text())
    except OSError:  # not Linux: torch's cpuinfo name is used alone
        return {}


def describe() -> dict:
    """This machine, as a JSON-able dict.

    Returns:
        ``cpu``: ``model`` (the kernel's model name, else torch's), ``vendor``, ``family`` and
        ``model_number`` (where ``/proc/cpuinfo`` has them: the name alone may be as vague as
        "AMD EPYC"), ``logical_cpus``, and the features torch reports as the engine reads them
        (:meth:`rerank_core.cpu.CpuFeatures.as_dict`: ``isa``, ``native_bf16``, ``amx_bf16``,
        ``avx512_bf16``, ``avx512``, ``avx2``, ``onednn_bf16``, ``cores``, ``ceiling``);
        ``gpus``: ``[{"name", "memory_gib"}]`` per visible CUDA device, empty without CUDA;
        ``torch``, ``cuda`` (torch's CUDA version or ``None``), ``torch_threads``, ``python``,
        ``platform``.
    """
    info = _cpuinfo()
    features = cpu_features().as_dict()
    cpu = {
        "model": info.get("model name") or features["name"],
        "vendor": info.get("vendor_id"),
        "family": info.get("cpu family"),
        "model_number": info.get("model"),
        "logical_cpus": os.cpu_count(),
        **features,
    }
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    return {
        "cpu": cpu,
        "gpus": gpus,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def summary(info: dict | None = None) -> str:
    """One line naming the hardware of ``info`` (default: :func:`describe` of this machine), e.g.
    ``hardware: CPU AMD EPYC (family 25, model 1), 2 cores, 2 logical CPUs, AVX2 (bf16 emulated);
    no GPU; torch 2.13.0+cpu, 2 threads``."""
    info = describe() if info is None else info
    cpu = info["cpu"]
    ids = ", ".join(f"{label} {cpu[key]}" for label, key in (("family", "family"), ("model", "model_number"))
                    if cpu.get(key))
    bf16 = "bf16 native" if cpu["native_bf16"] else "bf16 emulated"
    ceiling = f", capped at {cpu['ceiling']}" if cpu.get("ceiling") else ""
    text = (f"hardware: CPU {cpu['model']}{f' ({ids})' if ids else ''}, {cpu['cores']} cores, "
            f"{cpu['logical_cpus']} logical CPUs, {cpu['isa']} ({bf16}{ceiling}); ")
    gpus = info["gpus"]
    text += ", ".join(f"GPU {g['name']} ({g['memory_gib']} GiB)" for g in gpus) if gpus else "no GPU"
    return text + f"; torch {info['torch']}, {info['torch_threads']} threads"
