"""bench/allocator.py preloads the allocator it names, and a missing one is reported, not faked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import allocator as bench  # noqa: E402


def test_jemalloc_is_the_copy_rays_wheel_ships():
    env = bench.allocator_env("jemalloc")
    assert Path(env["LD_PRELOAD"]).name == "libjemalloc.so" and Path(env["LD_PRELOAD"]).is_file()
    assert "dirty_decay_ms:-1" in env["MALLOC_CONF"]
    assert bench.allocator_env("glibc") == {}


def test_a_missing_allocator_is_reported_as_missing(monkeypatch):
    monkeypatch.setattr(bench.ctypes.util, "find_library", lambda name: None)
    assert bench.allocator_env("tcmalloc") is None


@pytest.mark.slow
def test_each_process_runs_under_the_allocator_it_was_given(tiny_checkpoint):
    results = bench.measure(Path(tiny_checkpoint), ["glibc", "jemalloc"], ["float32"], rounds=1, docs=2, calls=1)
    assert set(results["allocators"]) == {"glibc", "jemalloc"}
    for name in ("glibc", "jemalloc"):
        figures = results["allocators"][name]["dtypes"]["float32"]
        assert figures["median_seconds"] > 0 and figures["peak_rss_gib"] > 0.1
    assert results["allocators"]["glibc"]["dtypes"]["float32"]["vs_glibc"] == 1.0
    # measure() itself refuses a child in which the preloaded library is not mapped.
