"""Compiled RMSNorm kernels (rerank_core.fused): same values, per-token, default in bf16 on CPU."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

import rerank_core.fused as fused_module
from rerank_core import EngineConfig, Reranker
from rerank_core.fused import compiled_rms_norm, fuse_rms_norms, fused, rms_norm_modules, unfuse_rms_norms

QUERY = "how do solar panels turn sunlight into electricity"
DOCS = [
    "Photovoltaic cells in a solar panel free electrons when light hits silicon, making a current.",
    "An inverter turns the panel's direct current into alternating current for the house.",
    "The recipe needs two cups of flour and a pinch of salt.",
    "Panels on a roof facing south get the most sun in the northern hemisphere.",
]


# torch.compile's CPU kernels are C++ built on the fly; without a compiler the engine keeps the
# eager norms (test_a_compile_failure_falls_back_to_eager_norms).
HAS_COMPILER = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler for torch.compile")


def _norm(width: int, dtype: torch.dtype, seed: int = 0) -> Qwen3RMSNorm:
    torch.manual_seed(seed)
    norm = Qwen3RMSNorm(width, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width).to(dtype))
    return norm


# The engine calls the kernel under inference mode only; calls in grad mode would compile other
# graphs (dynamo guards on the grad mode) and use up its recompile budget for the process.
@needs_compiler
@pytest.mark.parametrize("shape", [(1, 37, 64), (1, 37, 4, 16)])  # hidden states; per-head q/k
@torch.inference_mode()
def test_compiled_norm_matches_transformers(shape):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(shape, generator=g) * 3
    norm = _norm(shape[-1], torch.float32)
    eager = norm(hidden)
    got = compiled_rms_norm()(hidden, norm.weight, norm.variance_epsilon)
    assert torch.allclose(got, eager, atol=1e-5, rtol=1e-5)
    # bf16: the kernel rounds once where transformers rounds twice, so at most one step apart.
    norm16, hidden16 = _norm(shape[-1], torch.bfloat16), hidden.bfloat16()
    eager16 = norm16(hidden16).float()
    got16 = compiled_rms_norm()(hidden16, norm16.weight, norm16.variance_epsilon).float()
    assert got16.dtype == torch.float32 and got16.shape == eager16.shape
    step = eager16.abs().clamp_min(1e-3) * 2**-7
    assert bool(((got16 - eager16).abs() <= step).all())
    assert not torch.equal(got16, torch.zeros_like(got16))


@needs_compiler
@torch.inference_mode()
def test_each_token_is_normalized_alone():
    # Bit-identical whatever else is in the call: what keeps scores independent of batch-mates.
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, 300, 64, generator=g).bfloat16()
    norm = _norm(64, torch.bfloat16)
    whole = compiled_rms_norm()(hidden, norm.weight, norm.variance_epsilon)
    for start, stop in ((0, 1), (0, 7), (5, 64), (100, 300)):
        part = compiled_rms_norm()(hidden[:, start:stop], norm.weight, norm.variance_epsilon)
        assert torch.equal(part, whole[:, start:stop])


@needs_compiler
@torch.inference_mode()
def test_fuse_and_unfuse_swap_the_forward_of_every_norm():
    model = torch.nn.Sequential(_norm(16, torch.float32), torch.nn.Linear(16, 16), _norm(16, torch.float32, seed=1))
    x = torch.randn(1, 5, 16)
    before = model(x)
    assert len(rms_norm_modules(model)) == 2 and not fused(model)
    assert fuse_rms_norms(model) == 2 and fused(model)
    assert torch.allclose(model(x), before, atol=1e-5)
    unfuse_rms_norms(model)
    assert not fused(model) and torch.equal(model(x), before)


def test_default_by_device_and_dtype():
    config = EngineConfig()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert config.fused_norms(cpu, torch.bfloat16) and config.fused_norms(cpu, torch.float16)
    assert not config.fused_norms(cpu, torch.float32)  # the exact mode stays eager
    assert not config.fused_norms(cuda, torch.bfloat16)
    assert EngineConfig(fuse_norms=True).fused_norms(cpu, torch.float32)
    assert not EngineConfig(fuse_norms=False).fused_norms(cpu, torch.bfloat16)


@pytest.fixture(scope="module")
def fp32_scores(tiny_checkpoint):
    return Reranker.load(str(tiny_checkpoint), device="cpu", dtype="float32").score(QUERY, DOCS)


@needs_compiler
def test_bf16_engine_runs_compiled_norms_and_scores_as_closely(tiny_checkpoint, fp32_scores):
    fused_engine = Reranker.load(str(tiny_checkpoint), device="cpu", dtype="bfloat16")
    eager_engine = Reranker.load(str(tiny_checkpoint), device="cpu", dtype="bfloat16", config=EngineConfig(fuse_norms=False))
    assert fused_engine.fused_norms and fused_engine.fused_norms_failure is None
    assert fused(fused_engine.scorer.backbone) and not fused(eager_engine.scorer.backbone)
    got, eager = fused_engine.score(QUERY, DOCS), eager_engine.score(QUERY, DOCS)
    assert got != eager  # another rounding, so really another path
    worst_fused = max(abs(a - b) for a, b in zip(got, fp32_scores))
    worst_eager = max(abs(a - b) for a, b in zip(eager, fp32_scores))
    assert worst_fused < 2e-2 and worst_eager < 2e-2
    # The ranking is the model's, not the kernel's.
    order = sorted(range(len(DOCS)), key=lambda i: -fp32_scores[i])
    assert sorted(range(len(DOCS)), key=lambda i: -got[i]) == order


def test_fp32_engine_stays_eager(reranker):
    assert not reranker.fused_norms and not fused(reranker.scorer.backbone)


def test_a_compile_failure_falls_back_to_eager_norms(tiny_checkpoint, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(fused_module, "_compiled_rms_norm", broken)
    with caplog.at_level("WARNING", logger="rerank_core.reranker"):
        engine = Reranker.load(str(tiny_checkpoint), device="cpu", dtype="bfloat16")
    assert not engine.fused_norms and not fused(engine.scorer.backbone)
    assert engine.fused_norms_failure == "RuntimeError: no C++ compiler found"
    assert "eager norms" in caplog.text
    eager = Reranker.load(str(tiny_checkpoint), device="cpu", dtype="bfloat16", config=EngineConfig(fuse_norms=False))
    assert engine.score(QUERY, DOCS) == eager.score(QUERY, DOCS)
