"""glibc malloc settings for CPU passes (rerank_core/memory.py).

Their effect on page faults and speed is measured by ``bench/layouts.py`` (variants
``bf16-fresh-pages``); these tests check that the engine applies them, trims after every call,
and that they change no score.
"""

from __future__ import annotations

import pytest

from rerank_core import EngineConfig, Reranker, forward, memory

DOCS = ["a cat sat on the mat", "stock prices fell sharply", "cats are small felines"]


@pytest.mark.skipif(memory._glibc() is None, reason="glibc only")
def test_settings_are_accepted_by_glibc_and_apply_once():
    assert memory.reuse_freed_memory() is True
    assert memory.reuse_freed_memory() is True
    assert memory.release_freed_memory() in (True, False)


def test_without_glibc_the_settings_are_no_ops(monkeypatch):
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    assert memory.reuse_freed_memory() is False
    assert memory.release_freed_memory() is False


def test_engine_trims_after_every_call_and_scores_are_unchanged(tiny_checkpoint, reranker, monkeypatch):
    plain = Reranker.load(str(tiny_checkpoint), device="cpu", dtype="float32",
                          config=EngineConfig(reuse_freed_memory=False))
    assert plain.scorer.reuse_memory is False
    assert reranker.scorer.reuse_memory is (memory._glibc() is not None)
    calls = []
    monkeypatch.setattr(forward, "release_freed_memory", lambda: calls.append(1) or True)
    want = plain.score("what is a cat?", DOCS)
    assert calls == []
    assert reranker.score("what is a cat?", DOCS) == want
    assert calls == ([1] if reranker.scorer.reuse_memory else [])
