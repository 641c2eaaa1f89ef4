"""Compiled decoder layers (rerank_core.compiled): same values, per token, default in bf16 on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding

import rerank_core.compiled as compiled_module
from rerank_core import EngineConfig, Reranker
from rerank_core.compiled import compile_layers, compiled, decoder_layers, uncompile_layers
from rerank_core.cpu import force_cpu_features
from tests.cpu_kinds import CPU_KINDS

QUERY = "how do solar panels turn sunlight into electricity"
DOCS = [
    "Photovoltaic cells in a solar panel free electrons when light hits silicon, making a current.",
    "An inverter turns the panel's direct current into alternating current for the house.",
    "The recipe needs two cups of flour and a pinch of salt.",
    "Panels on a roof facing south get the most sun in the northern hemisphere.",
]


# torch.compile's CPU kernels are C++ built on the fly; without a compiler the engine keeps the
# eager layers (test_a_compile_failure_falls_back_to_eager_layers).
HAS_COMPILER = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler for torch.compile")


def _layers(tiny_checkpoint, dtype: torch.dtype, count: int = 2):
    """``count`` randomly initialized decoder layers of the tiny shape, and their rotary embedding."""
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(Qwen3DecoderLayer(config, i) for i in range(count)).to(dtype).eval()
    return layers, Qwen3RotaryEmbedding(config)


def _run(layers, rotary, hidden):
    positions = torch.arange(hidden.shape[1])[None]
    cos_sin = rotary(hidden, positions)
    for layer in layers:
        hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)
    return hidden


# The engine runs the layers under inference mode only; calls in grad mode would compile other
# graphs (dynamo guards on the grad mode) and use up its recompile budget for the process.
@needs_compiler
@torch.inference_mode()
def test_compiled_layers_match_transformers_and_share_one_compilation(tiny_checkpoint):
    layers, rotary = _layers(tiny_checkpoint, torch.float32)
    hidden = torch.randn(1, 37, layers[0].hidden_size, generator=torch.Generator().manual_seed(1))
    eager = _run(layers, rotary, hidden)
    assert len(decoder_layers(layers)) == 2 and not compiled(layers)
    assert compile_layers(layers) == 2 and compiled(layers)
    got = _run(layers, rotary, hidden)
    assert torch.allclose(got, eager, atol=1e-4, rtol=1e-4)
    assert not torch.equal(got, torch.zeros_like(got))
    # One compiled forward per class, shared by every layer.
    assert list(compiled_module._COMPILED) == [Qwen3DecoderLayer]
    uncompile_layers(layers)
    assert not compiled(layers) and torch.equal(_run(layers, rotary, hidden), eager)


@pytest.mark.parametrize("kind", ["AMX", "AVX512-BF16", "AVX-512", "AVX2"])
def test_default_by_device_dtype_layout_and_cpu_kind(kind):
    config = EngineConfig()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    native = kind in ("AMX", "AVX512-BF16")
    with force_cpu_features(CPU_KINDS[kind]):
        # On by default in half precision where bf16 is native (where it was measured), else eager.
        assert config.compiled_layers(cpu, torch.bfloat16) is native
        assert config.compiled_layers(cpu, torch.float16) is native
        assert not config.compiled_layers(cpu, torch.float32)  # the exact mode stays eager
        assert not config.compiled_layers(cuda, torch.bfloat16)
        assert EngineConfig(compile_layers=True).compiled_layers(cpu, torch.float32)
        assert EngineConfig(compile_layers=True).compiled_layers(cpu, torch.bfloat16)
        assert not EngineConfig(compile_layers=False).compiled_layers(cpu, torch.bfloat16)
    # Padded passes are never compiled: asking for both is refused.
    with pytest.raises(ValueError, match="compile_layers needs packed passes"):
        EngineConfig(packing=False, compile_layers=True)
    assert not EngineConfig(packing=False).compiled_layers(cpu, torch.bfloat16)


@pytest.fixture(scope="module")
def fp32_scores(tiny_checkpoint):
    return Reranker.load(str(tiny_checkpoint), device="cpu", dtype="float32").score(QUERY, DOCS)


@needs_compiler
def test_bf16_engine_runs_compiled_layers_and_scores_as_closely(tiny_checkpoint, fp32_scores):
    # Asked for explicitly: the default depends on the CPU kind (test_default_by_...).
    compiled_engine = Reranker.load(
        str(tiny_checkpoint), device="cpu", dtype="bfloat16", config=EngineConfig(compile_layers=True)
    )
    eager_engine = Reranker.load(
        str(tiny_checkpoint), device="cpu", dtype="bfloat16", config=EngineConfig(compile_layers=False)
    )
    assert compiled_engine.compiled_layers and compiled_engine.compiled_layers_failure is None
    assert compiled(compiled_engine.scorer.backbone) and not compiled(eager_engine.scorer.backbone)
    got, eager = compiled_engine.score(QUERY, DOCS), eager_engine.score(QUERY, DOCS)
    assert got != eager  # another rounding, so really another path
    worst_compiled = max(abs(a - b) for a, b in zip(got, fp32_scores))
    worst_eager = max(abs(a - b) for a, b in zip(eager, fp32_scores))
    assert worst_compiled < 2e-2 and worst_eager < 2e-2
    # The ranking is the model's, not the kernel's.
    order = sorted(range(len(DOCS)), key=lambda i: -fp32_scores[i])
    assert sorted(range(len(DOCS)), key=lambda i: -got[i]) == order
    # Other pass sizes and layouts (a prefix pass, several documents, two queries) reuse the
    # compiled layers: no fall-back to eager for hitting dynamo's recompile limit.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        compiled_engine.score_encoded([compiled_engine.encode(QUERY, DOCS[:3]), compiled_engine.encode("solar", DOCS)])
        compiled_engine.score(QUERY, DOCS * 5)


def test_fp32_and_padded_engines_stay_eager(reranker, tiny_checkpoint, monkeypatch, caplog):
    assert not reranker.compiled_layers and not compiled(reranker.scorer.backbone)
    padded = Reranker.load(str(tiny_checkpoint), device="cpu", dtype="bfloat16", config=EngineConfig(packing=False))
    assert not padded.compiled_layers and padded.compiled_layers_failure is None
    # Asked for where packing resolves off (as on CUDA in fp32): said, not silently dropped.
    monkeypatch.setattr(EngineConfig, "packed", lambda self, device, dtype=None: False)
    with caplog.at_level("WARNING", logger="rerank_core.reranker"):
        asked = Reranker.load(str(tiny_checkpoint), device="cpu", dtype="float32", config=EngineConfig(compile_layers=True))
    assert not asked.compiled_layers and asked.compiled_layers_failure == "padded passes are never compiled"
    assert "compile_layers is on but this engine runs padded passes" in caplog.text


def test_a_compile_failure_falls_back_to_eager_layers(tiny_checkpoint, monkeypatch, caplog):
    def broken(cls):
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler found\nsecond line")

        return fail

    monkeypatch.setattr(compiled_module, "compiled_forward", broken)
    with caplog.at_level("WARNING", logger="rerank_core.reranker"):
        engine = Reranker.load(
            str(tiny_checkpoint), device="cpu", dtype="bfloat16", config=EngineConfig(compile_layers=True)
        )
    assert not engine.compiled_layers and not compiled(engine.scorer.backbone)
    assert engine.compiled_layers_failure == "RuntimeError: no C++ compiler found"
    assert "running them eagerly" in caplog.text
    eager = Reranker.load(str(tiny_checkpoint), device="cpu", dtype="bfloat16", config=EngineConfig(compile_layers=False))
    assert engine.score(QUERY, DOCS) == eager.score(QUERY, DOCS)


# One process's compiled activation quantization against eager, and the vector ISA it compiled for.
_QUANTIZE_CHILD = """
import json, torch
from torch._inductor.cpu_vec_isa import pick_vec_isa
from rerank_core.quantized import fused_quantize, quantize_activation
torch.manual_seed(0)
rows = torch.randn(37, 1000) * 3
got, eager = fused_quantize(rows), quantize_activation(rows)
same = fused_quantize.failure is None and all(torch.equal(a, b) for a, b in zip(got, eager))
print(json.dumps({"isa": str(pick_vec_isa()), "same": same, "failure": fused_quantize.failure}))
"""


@needs_compiler
def test_processes_of_two_vector_widths_share_one_compile_cache_safely(tmp_path):
    # inductor's cache key leaves the vector ISA out (rerank_core.cpu.pin_compiled_vector_width):
    # without the pin, the second process below found the first one's AVX2 graph and crashed
    # with heap corruption on an AVX-512 CPU. Where AVX2 is all the CPU has, all three runs
    # share one width, and reuse alone is checked.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    env.pop("ATEN_CPU_CAPABILITY", None)
    runs = []
    for extra in ({"ATEN_CPU_CAPABILITY": "avx2"}, {}, {"ATEN_CPU_CAPABILITY": "avx2"}):
        out = subprocess.run([sys.executable, "-c", _QUANTIZE_CHILD], env={**env, **extra}, capture_output=True,
                             text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.splitlines()[-1]))
    assert all(run["same"] for run in runs), runs
    assert runs[0]["isa"] == runs[2]["isa"] == "avx2"
