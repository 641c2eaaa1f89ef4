"""Session fixtures: one tiny random Qwen3-Reranker checkpoint with the real Qwen3 tokenizer."""

from __future__ import annotations

import pytest
import torch

from rerank_core import Reranker
from rerank_core.cpu import cpu_features
from rerank_core.synthetic import build_checkpoint

# oneDNN reads its ISA ceiling (ONEDNN_MAX_CPU_ISA) once, at its first ISA query, and keeps it for
# the process: query it now, with the environment the suite was started with, before any test
# changes that variable (tests/test_cpu.py), and probe this CPU once likewise.
torch.ops.mkldnn._is_mkldnn_bf16_supported()
cpu_features()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Directory of a seeded tiny ``Qwen3ForCausalLM`` + tokenizer, built once per session."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny-reranker"), shape="tiny", seed=0)


@pytest.fixture(scope="session")
def reranker(tiny_checkpoint):
    """The engine, loaded through the same path users take."""
    return Reranker.load(str(tiny_checkpoint), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def official_model(tiny_checkpoint):
    """The plain transformers model and tokenizer, for the reference procedure."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint, padding_side="left")
    return model, tokenizer


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance with Serve for the session; yields the HTTP base URL.

    Start-up costs seconds on 2 cores, so it happens once.

    More logical CPUs than physical ones: test replicas ask for ``num_cpus: 0`` anyway.
    """
    import ray
    from ray import serve

    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
