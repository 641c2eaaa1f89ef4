"""The GPU benchmark's own arithmetic (bench/gpu_steps.py) and bench/host.py, run on CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import gpu_steps  # noqa: E402
import host  # noqa: E402


@pytest.mark.parametrize("name,kind", [
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
     "elementwise and norms"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matrix products"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT", "matrix products"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("Memcpy HtoD (Pinned -> Device)", "copies"),
    ("void at::native::index_copy_kernel_impl<long>", "gathers and index ops"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float>>>",
     "elementwise and norms"),
    ("some_unknown_kernel", "other"),
])
def test_kernels_are_classified_by_name(name, kind):
    assert gpu_steps.classify(name) == kind


def test_busy_time_is_the_union_of_kernel_intervals():
    assert gpu_steps.busy_time([]) == 0.0
    assert gpu_steps.busy_time([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0), (3.2, 3.5)]) == 3.0


def test_host_bench_runs_on_cpu_and_fewer_passes_cost_less_host_time(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "host.json"
    assert host.main(["--checkpoint", str(tiny_checkpoint), "--layers", "2", "--queries", "2", "--docs", "8",
                      "--budgets", "256,4096", "--repeats", "1", "--no-compiled", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    small, large = report["budgets"]["256"], report["budgets"]["4096"]
    assert report["pairs"] == 16 and report["hardware"]["cpu"]["isa"]
    assert small["passes"] > large["passes"] >= 1
    layers = report["layers"]["eager"]
    assert layers["computing_ops"] < layers["aten_ops"] and layers["per_pass_ms"] > 0
    # The estimate is preparation plus passes times the layer stack's time per pass.
    assert large["host_ms_eager"] == pytest.approx(large["prep_ms"] + large["passes"] * layers["per_pass_ms"])
    assert "[budget   4096]" in capsys.readouterr().out


def test_fp8_step_on_cpu_records_the_refusal_and_bf16s_fidelity(tiny_checkpoint):
    from rerank_core import EngineConfig, Reranker

    def load(dtype):
        return Reranker.load(str(tiny_checkpoint), config=EngineConfig(device="cpu", dtype=dtype))

    requests = [("what is a reranker", ["a model that orders documents", "a fish", "ranking by relevance"])] * 2
    out = gpu_steps.fp8(load, requests, torch.device("cpu"), repeats=1, rate=None)
    assert "fp8 runs on cuda only" in out["dtypes"]["fp8"]["refused"] and "fp8/bf16 pairs/s" not in out
    bf16 = out["dtypes"]["bfloat16"]
    assert bf16["pairs_per_s"] > 0 and bf16["vs_float32"]["pairs"] == 6 and bf16["vs_float32"]["queries"] == 2
    assert 0 < bf16["vs_float32"]["max_abs_diff"] < 0.2
    assert out["dtypes"]["float32"]["pairs_per_s"] > 0 and "vs_float32" not in out["dtypes"]["float32"]
