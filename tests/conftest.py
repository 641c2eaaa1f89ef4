"""Session fixtures: one tiny random Qwen3-Reranker checkpoint with the real Qwen3 tokenizer."""

from __future__ import annotations

import pytest

from rerank_core import Reranker
from rerank_core.synthetic import build_checkpoint


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
