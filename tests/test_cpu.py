"""The CPU feature probe (rerank_core.cpu) and the choices each kind of x86 CPU gets from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rerank_core import EngineConfig
from rerank_core import cpu as cpu_module
from rerank_core.cpu import CpuFeatures, force_cpu_features, onednn_isa, probe
from rerank_core.invariant import TiledLinear, can_prepack
from tests.cpu_kinds import CPU_KINDS

CPU = torch.device("cpu")


def test_the_probe_reports_what_torch_reports(monkeypatch):
    for variable in cpu_module.CEILING_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    found = torch.cpu.get_capabilities()
    features = probe()
    assert features.avx2 == found["avx2"]
    assert features.amx_bf16 == found["amx_bf16"] and features.avx512_bf16 == found["avx512_bf16"]
    assert features.avx512 == all(found[f] for f in ("avx512_f", "avx512_bw", "avx512_vl", "avx512_dq"))
    assert features.onednn_bf16 == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert features.native_bf16 == (found["amx_bf16"] or found["avx512_bf16"])
    assert features.ceiling is None and features.name == found["cpu_name"]
    assert features.isa in ("AMX", "AVX512-BF16", "AVX-512", "AVX2", "pre-AVX2")
    assert features.isa in features.describe() and json.dumps(features.as_dict())


@pytest.mark.parametrize(
    "ceiling, isa, onednn_bf16",
    [("AVX2", "AVX2", False), ("avx2_vnni_2", "AVX2", False), ("AVX512_CORE", "AVX-512", True),
     ("AVX512_CORE_BF16", "AVX512-BF16", True), ("AVX512_CORE_AMX", "AMX", True), ("ALL", "AMX", True),
     ("SSE41", "pre-AVX2", False)],
)
def test_a_onednn_ceiling_lowers_the_features(ceiling, isa, onednn_bf16):
    capped = CPU_KINDS["AMX"].capped(ceiling)
    assert capped.isa == isa and capped.onednn_bf16 is onednn_bf16
    assert capped.ceiling == onednn_isa(ceiling)


def test_a_ceiling_never_adds_a_feature():
    avx2 = CPU_KINDS["AVX2"]
    assert avx2.capped("ALL").isa == "AVX2" and not avx2.capped("ALL").onednn_bf16
    # AVX-NE-CONVERT (an AVX2 CPU whose oneDNN has bf16) survives AVX2_VNNI_2, not AVX2.
    ne = CpuFeatures("x", 2, True, False, False, False, True, True)
    assert ne.capped("AVX2_VNNI_2").onednn_bf16 and not ne.capped("AVX2").onednn_bf16


def test_the_ceiling_is_read_from_onednn_variables(monkeypatch, caplog):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "avx2")
    assert probe().ceiling == "AVX2" and not probe().native_bf16
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "sse41")  # the current name wins
    assert probe().isa == "pre-AVX2"
    with pytest.raises(ValueError, match="unknown oneDNN CPU ISA 'AVX3'; one of SSE41"):
        onednn_isa("AVX3")
    # A name oneDNN does not know is ignored, as oneDNN ignores it, and said.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX3")
    with caplog.at_level("WARNING", logger="rerank_core.cpu"):
        assert probe().ceiling is None
    assert "ONEDNN_MAX_CPU_ISA ignored: unknown oneDNN CPU ISA 'AVX3'" in caplog.text


def test_torch_and_this_probe_follow_the_ceiling_in_a_fresh_process():
    """What a forced-AVX2 run relies on: oneDNN reads the variable at start-up, torch's bf16
    check follows oneDNN, and so does every choice of the engine."""
    code = (
        "import json, torch; from rerank_core.cpu import cpu_features;"
        "print(json.dumps([torch.ops.mkldnn._is_mkldnn_bf16_supported(), cpu_features().as_dict()]))"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
    onednn_bf16, features = json.loads(out.stdout)
    assert onednn_bf16 is False
    assert features["isa"] in ("AVX2", "pre-AVX2") and features["onednn_bf16"] is False
    assert features["native_bf16"] is False and features["ceiling"] == "AVX2"


EXPECTED = {  # kind: (dtype "auto", compiled layers in bf16 by default, bf16 weights reordered)
    "AMX": (torch.bfloat16, True, True),
    "AVX512-BF16": (torch.bfloat16, True, True),
    "AVX-512": (torch.float32, False, True),
    "AVX2": (torch.float32, False, False),
}


@pytest.mark.parametrize("kind", list(CPU_KINDS))
def test_the_choices_of_each_cpu_kind(kind):
    dtype, compiled, reordered = EXPECTED[kind]
    weight = torch.zeros(4, 4, dtype=torch.bfloat16)
    with force_cpu_features(CPU_KINDS[kind]):
        config = EngineConfig(device="cpu")
        assert config.torch_dtype() == dtype
        assert config.packed(CPU, dtype) and not config.invariant(CPU, dtype)
        assert config.compiled_layers(CPU, torch.bfloat16) is compiled
        assert config.compiled_layers(CPU, torch.float32) is False
        assert can_prepack(weight) is reordered
        assert not can_prepack(weight.float())


def test_tiles_reorder_weights_only_where_onednn_has_bf16():
    linear = torch.nn.Linear(16, 8, bias=False).to(torch.bfloat16)
    assert TiledLinear(linear).prepacked == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    # The AVX2 choice runs on any CPU: plain bf16 tiles.
    with force_cpu_features(CPU_KINDS["AVX2"]):
        tiled = TiledLinear(linear, tile_rows=4)
    assert not tiled.prepacked
    x = torch.randn(6, 16, dtype=torch.bfloat16)
    assert (tiled(x).float() - linear(x).float()).abs().max() <= 2e-2
