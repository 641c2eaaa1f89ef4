"""The varlen packed path (rerank_core.varlen): layout, attention, engine parity, start-up fallback.

Everything runs on CPU with :func:`reference_varlen_attn` standing in for torch's CUDA kernel;
the test marked ``gpu`` compares the two where CUDA is present.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rerank_core import EngineConfig, Reranker
from rerank_core.invariant import tiled
from rerank_core.packing import PrefixRef, Segments, segment_attention
from rerank_core.varlen import (
    PROBES,
    SELF_CHECK_TOLERANCE,
    VarlenAttention,
    VarlenPass,
    build_layout,
    reference_varlen_attn,
    varlen_attention,
)

TOL = 1e-5  # fp32
HEADS, KV_HEADS, DIM = 4, 2, 8


def _random_kv(tokens: int, layers: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(1, KV_HEADS, tokens, DIM, generator=g), torch.randn(1, KV_HEADS, tokens, DIM, generator=g))
        for _ in range(layers)
    ]


def _mixed_segments(stores=None) -> Segments:
    """Four segments: prefixes from two stores (one store used twice), and one without a prefix."""
    prefixes = [PrefixRef(0, 0, 5), None, PrefixRef(1, 2, 3), PrefixRef(0, 5, 2)]
    return Segments([3, 2, 4, 1], prefixes, stores or [])


# --- the layout -------------------------------------------------------------------------------


def test_varlen_layout_of_mixed_prefixes():
    segments = _mixed_segments()
    layout = build_layout(segments)
    # Keys per segment: prefix + own = 5+3, 0+2, 3+4, 2+1.
    assert layout.cu_seq_q.tolist() == [0, 3, 5, 9, 10]
    assert layout.cu_seq_k.tolist() == [0, 8, 10, 17, 20]
    assert layout.cu_seq_q.dtype == layout.cu_seq_k.dtype == torch.int32
    assert (layout.max_q, layout.max_k, layout.total_k) == (4, 8, 20)
    # Own keys follow each segment's prefix keys.
    assert layout.own_dst.tolist() == [5, 6, 7, 8, 9, 13, 14, 15, 16, 19]
    sources = {s.store: (s.src.tolist(), s.dst.tolist()) for s in layout.sources}
    assert sources == {
        0: ([0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 17, 18]),
        1: ([2, 3, 4], [10, 11, 12]),
    }
    # Positions continue after each prefix; each pair's score is read at its segment's last token.
    assert segments.positions() == [5, 6, 7, 0, 1, 3, 4, 5, 6, 2]
    assert segments.ends() == [2, 4, 8, 9]


def test_varlen_layout_without_prefixes_uses_the_keys_as_they_are():
    layout = build_layout(Segments([4, 1, 3], [None, None, None]))
    assert layout.cu_seq_q.tolist() == layout.cu_seq_k.tolist() == [0, 4, 5, 8]
    assert (layout.max_q, layout.max_k, layout.total_k) == (4, 4, 8)
    assert layout.own_dst is None and layout.sources == ()


def _layout_by_token(segments: Segments):
    """The layout, one token at a time: an independent statement of what build_layout computes."""
    cu_q, cu_k, own_dst, gathers = [0], [0], [], {}
    for length, prefix in zip(segments.lengths, segments.prefixes):
        start = cu_k[-1]
        p = prefix.length if prefix else 0
        for k in range(p):
            src, dst = gathers.setdefault(prefix.store, ([], []))
            src.append(prefix.start + k)
            dst.append(start + k)
        own_dst += [start + p + t for t in range(length)]
        cu_q.append(cu_q[-1] + length)
        cu_k.append(start + p + length)
    return cu_q, cu_k, own_dst if gathers else None, {s: g for s, g in sorted(gathers.items())}


@pytest.mark.parametrize("seed", range(20))
def test_varlen_layout_matches_a_token_by_token_layout(seed):
    g = torch.Generator().manual_seed(seed)
    count = int(torch.randint(1, 40, (1,), generator=g))
    lengths = torch.randint(1, 30, (count,), generator=g).tolist()
    prefixes = []
    for _ in range(count):
        if seed % 5 == 0 or torch.rand(1, generator=g) < 0.3:
            prefixes.append(None)  # every fifth case: no prefixes at all
        else:
            store, start, length = (int(x) for x in torch.randint(0, 3, (1,), generator=g).tolist()
                                    + torch.randint(0, 50, (1,), generator=g).tolist()
                                    + torch.randint(1, 20, (1,), generator=g).tolist())
            prefixes.append(PrefixRef(store, start, length))
    segments = Segments(lengths, prefixes)
    layout = build_layout(segments)
    cu_q, cu_k, own_dst, gathers = _layout_by_token(segments)
    assert layout.cu_seq_q.tolist() == cu_q and layout.cu_seq_k.tolist() == cu_k
    assert (layout.own_dst.tolist() if layout.own_dst is not None else None) == own_dst
    assert {s.store: (s.src.tolist(), s.dst.tolist()) for s in layout.sources} == gathers
    assert layout.total_k == cu_k[-1] and layout.max_q == max(lengths)
    assert layout.max_k == max(b - a for a, b in zip(cu_k, cu_k[1:]))
    expected_positions = [(p.length if p else 0) + t for n, p in zip(lengths, prefixes) for t in range(n)]
    assert segments.positions() == expected_positions
    assert segments.ends() == [sum(lengths[: i + 1]) - 1 for i in range(count)]


# --- the reference kernel ---------------------------------------------------------------------


def _dense_varlen(q, k, v, cu_q, cu_k, window):
    """One masked attention over the whole packed row: an independent statement of the semantics."""
    left, right = window
    allowed = torch.zeros(q.shape[0], k.shape[0], dtype=torch.bool)
    for s in range(len(cu_q) - 1):
        lq, lk = cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s]
        for i in range(lq):
            for j in range(lk):
                diagonal = i + lk - lq  # bottom-right alignment
                ok = (right < 0 or j <= diagonal + right) and (left < 0 or j >= diagonal - left)
                allowed[cu_q[s] + i, cu_k[s] + j] = ok
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=allowed, enable_gqa=True
    )
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("window", [(-1, 0), (-1, -1), (2, 0)], ids=["causal", "full", "sliding"])
def test_varlen_reference_kernel_matches_a_dense_mask(window):
    g = torch.Generator().manual_seed(1)
    cu_q, cu_k = [0, 3, 4, 9], [0, 7, 8, 15]  # more keys than queries, equal, and more again
    q = torch.randn(9, HEADS, DIM, generator=g)
    k, v = torch.randn(15, KV_HEADS, DIM, generator=g), torch.randn(15, KV_HEADS, DIM, generator=g)
    got = reference_varlen_attn(
        q, k, v, torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32), 5, 7,
        window_size=window, enable_gqa=True,
    )
    assert torch.allclose(got, _dense_varlen(q, k, v, cu_q, cu_k, window), atol=TOL)


def test_varlen_reference_causal_is_bottom_right_not_sdpa_top_left():
    """With 2 queries and 5 keys, query 0 sees keys 0..3 (flash), not key 0 only (SDPA's is_causal)."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(n, 1, DIM, generator=g) for n in (2, 5, 5))
    cu_q, cu_k = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    got = reference_varlen_attn(q, k, v, cu_q, cu_k, 2, 5, window_size=(-1, 0))
    first = F.scaled_dot_product_attention(q[:1].transpose(0, 1), k[:4].transpose(0, 1), v[:4].transpose(0, 1))
    assert torch.allclose(got[0], first.transpose(0, 1)[0], atol=TOL)
    top_left = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
    assert not torch.allclose(got, top_left.transpose(0, 1), atol=1e-3)


def test_varlen_reference_refuses_paged_keys():
    x = torch.zeros(2, 1, DIM)
    cu = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="paged"):
        reference_varlen_attn(x, x, x, cu, cu, 2, 2, block_table=torch.zeros(1, 1, dtype=torch.int32))


# --- one attention call per layer against the CPU packed path ----------------------------------


def test_varlen_attention_matches_segment_attention_with_prefixes():
    stores = [_random_kv(8, layers=2, seed=3), _random_kv(6, layers=2, seed=4)]
    g = torch.Generator().manual_seed(5)
    query = torch.randn(1, HEADS, 10, DIM, generator=g)
    key, value = torch.randn(1, KV_HEADS, 10, DIM, generator=g), torch.randn(1, KV_HEADS, 10, DIM, generator=g)
    for layer in (0, 1):
        module = SimpleNamespace(layer_idx=layer)
        want, _ = segment_attention(module, query, key, value, _mixed_segments(stores), scaling=0.3)
        segments = _mixed_segments(stores)
        packed = VarlenPass(segments, build_layout(segments), reference_varlen_attn)
        got, _ = varlen_attention(module, query, key, value, packed, scaling=0.3)
        assert got.shape == want.shape == (1, 10, HEADS, DIM)
        assert torch.allclose(got, want, atol=TOL)


def test_varlen_attention_records_prefix_passes_like_the_cpu_path():
    g = torch.Generator().manual_seed(6)
    query = torch.randn(1, HEADS, 7, DIM, generator=g)
    key, value = torch.randn(1, KV_HEADS, 7, DIM, generator=g), torch.randn(1, KV_HEADS, 7, DIM, generator=g)
    module = SimpleNamespace(layer_idx=0)
    cpu = Segments([4, 3], [None, None], record=[])
    want, _ = segment_attention(module, query, key, value, cpu)
    segments = Segments([4, 3], [None, None], record=[])
    got, _ = varlen_attention(module, query, key, value, VarlenPass(segments, build_layout(segments), reference_varlen_attn))
    assert torch.allclose(got, want, atol=TOL)
    assert segments.record[0][0] is key and segments.record[0][1] is value


def test_varlen_attention_hands_other_masks_to_sdpa():
    g = torch.Generator().manual_seed(7)
    query = torch.randn(2, HEADS, 5, DIM, generator=g)
    key, value = torch.randn(2, KV_HEADS, 5, DIM, generator=g), torch.randn(2, KV_HEADS, 5, DIM, generator=g)
    module = SimpleNamespace(layer_idx=0, is_causal=True, num_key_value_groups=HEADS // KV_HEADS, training=False)
    got, _ = varlen_attention(module, query, key, value, None)
    want = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True).transpose(1, 2)
    assert torch.allclose(got, want, atol=TOL)


# --- the engine on the tiny checkpoint -----------------------------------------------------------

QUERIES = [
    ("q", ["a b c", "hello world, a longer document " * 5, "x"], None),
    ("What is the capital of China? " * 4, ["Beijing", "no", "The capital of China is Beijing."], None),
    ("single", ["only one document here"], None),  # no prefix pass: runs as one whole pair
    ("why?", ["def add(a, b):\n    return a + b", "北京是中华人民共和国的首都"], "Find code answers"),
    ("one more single", ["short"], "Another instruction"),
]


def _load(checkpoint, kernel=reference_varlen_attn, **config):
    config = EngineConfig(**{"packing": True, "packed_attention": "varlen", **config})
    return Reranker.load(str(checkpoint), device="cpu", dtype="float32", config=config, varlen_kernel=kernel)


def _score(engine, queries=QUERIES):
    return engine.scorer.score([engine.encode(q, d, i) for q, d, i in queries])


def _close(got, want, tol=TOL):
    worst = max(abs(a - b) for row_a, row_b in zip(got, want, strict=True) for a, b in zip(row_a, row_b, strict=True))
    assert worst <= tol, f"max difference {worst}"


@pytest.fixture(scope="module")
def varlen_engine(tiny_checkpoint):
    return _load(tiny_checkpoint)


@pytest.fixture(scope="module")
def padded_engine(tiny_checkpoint):
    return Reranker.load(str(tiny_checkpoint), device="cpu", dtype="float32", config=EngineConfig(packing=False))


def test_varlen_engine_matches_the_cpu_packed_path(varlen_engine, reranker, padded_engine):
    """Queries with different prefix lengths and single-document queries in one call, fp32."""
    assert varlen_engine.packed_check_failure is None
    # The check's margin is recorded: in fp32 the two paths differ by rounding only.
    assert 0.0 <= varlen_engine.packed_check_difference < TOL
    assert isinstance(varlen_engine.scorer.packed_attention, VarlenAttention)
    assert reranker.scorer.packing and reranker.scorer.packed_attention is None  # per-segment SDPA
    got = _score(varlen_engine)
    # Two passes: the three shared prefixes in one, every document part (and both single-document
    # pairs, prefix included) in the other.
    assert got.stats.forward_passes == 2
    assert got.stats.padded_tokens == got.stats.tokens
    _close(got.scores, _score(reranker).scores)
    _close(got.scores, _score(padded_engine).scores)


def test_varlen_engine_across_many_passes_and_prefix_stores(tiny_checkpoint, reranker):
    """Small budgets: prefixes recorded in several passes, documents spread over several more."""
    engine = _load(tiny_checkpoint, max_batch_tokens=120, max_batch_pairs=3)
    segments = Reranker.load(
        str(tiny_checkpoint), device="cpu", dtype="float32",
        config=EngineConfig(packing=True, max_batch_tokens=120, max_batch_pairs=3),
    )
    got, want = _score(engine), _score(segments)
    assert got.stats.forward_passes == want.stats.forward_passes > 4
    _close(got.scores, want.scores)


def test_varlen_passes_stage_their_inputs_once_and_the_call_reads_the_device_once(tiny_checkpoint, monkeypatch):
    """Nothing between passes waits for the device: one staged transfer per pass, one read per call."""
    engine = _load(tiny_checkpoint, max_batch_tokens=120, max_batch_pairs=3)
    encoded = [engine.encode(q, d, i) for q, d, i in QUERIES]
    want = engine.scorer.score(encoded).scores
    transfers, reads = [], []
    staging = engine.scorer.staging
    real_to_device, real_cpu = staging.to_device, torch.Tensor.cpu
    monkeypatch.setattr(staging, "to_device", lambda arrays: transfers.append(len(arrays)) or real_to_device(arrays))
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: reads.append(self.shape) or real_cpu(self, *a, **k))
    got = engine.scorer.score(encoded)
    assert got.scores == want
    assert len(transfers) == got.stats.forward_passes > 4
    # ids, positions, kept rows, then the layout's arrays (prefix passes have no gathers).
    assert min(transfers) >= 5
    assert len(reads) == 1 and reads[0] == (sum(len(e.documents) for e in encoded),)


def test_varlen_engine_without_prefix_sharing(tiny_checkpoint, reranker):
    engine = _load(tiny_checkpoint, share_prefix=False)
    _close(_score(engine).scores, _score(reranker).scores)


def test_varlen_engine_keeps_padding_masks_for_ordinary_calls(varlen_engine, official_model):
    model, tokenizer = official_model
    batch = tokenizer(["a short one", "a somewhat longer sentence with more tokens in it"], padding=True, return_tensors="pt")
    assert varlen_engine.scorer.backbone.config._attn_implementation == "rerank_core_varlen"
    with torch.inference_mode():
        got = varlen_engine.scorer.backbone(**batch).last_hidden_state
        want = model.get_decoder()(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert torch.allclose(got[real], want[real], atol=TOL)


def test_varlen_probes_cover_several_prefixes_mixed_lengths_and_a_single_document(varlen_engine):
    encoded = [varlen_engine.encode(q, list(d)) for q, d in PROBES]
    shared = {len(e.shared) for e in encoded if len(e.documents) > 1}
    lengths = [len(doc) for e in encoded for doc in e.documents]
    assert len(shared) >= 2
    assert min(lengths) < 16 and max(lengths) > 200  # a document part includes the ~10-token suffix
    assert any(len(e.documents) == 1 for e in encoded)


# --- start-up self-check and fallback ------------------------------------------------------------


def _top_left_causal_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                            enable_gqa=False, **kwargs):
    """A plausible wrong kernel: SDPA's top-left causal mask, so a document misses most of its prefix."""
    out = query.new_empty(query.shape)
    cq, ck = cu_seq_q.tolist(), cu_seq_k.tolist()
    for s in range(len(cq) - 1):
        q, k, v = (t[a:b].transpose(0, 1)[None] for t, a, b in
                   ((query, cq[s], cq[s + 1]), (key, ck[s], ck[s + 1]), (value, ck[s], ck[s + 1])))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
        out[cq[s] : cq[s + 1]] = o[0].transpose(0, 1)
    return out


def _raising_kernel(*args, **kwargs):
    raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.\nmore details")


def _nan_kernel(query, *args, **kwargs):
    return torch.full_like(query, float("nan"))


@pytest.mark.parametrize(
    "kernel,reason",
    [
        (_top_left_causal_kernel, "packed and padded scores differ by"),
        (_raising_kernel, "the packed pass raised RuntimeError: FlashAttention only supports Ampere GPUs or newer."),
        (_nan_kernel, "as nan"),
    ],
    ids=["wrong-mask", "raises", "nan"],
)
def test_fallback_to_padded_when_the_varlen_kernel_is_wrong(tiny_checkpoint, padded_engine, caplog, kernel, reason):
    with caplog.at_level(logging.WARNING, logger="rerank_core.varlen"):
        engine = _load(tiny_checkpoint, kernel=kernel)
    assert reason in engine.packed_check_failure
    assert "more details" not in engine.packed_check_failure
    assert engine.scorer.packing is False
    assert engine.scorer.backbone.config._attn_implementation == "sdpa"
    assert any(
        r.levelname == "WARNING" and "serving padded passes" in r.getMessage() and reason in r.getMessage()
        for r in caplog.records
    )
    # What is served is the padded path's scores, exactly.
    result = _score(engine)
    assert result.stats.padded_tokens > result.stats.tokens
    assert result.scores == _score(padded_engine).scores


def test_batch_invariant_layers_are_tiled_once_for_varlen_and_put_back_for_a_padded_fallback(
    tiny_checkpoint, padded_engine
):
    """One backbone serves both scorers: the tiles belong to the packed one only."""
    kept = _load(tiny_checkpoint, batch_invariant=True)
    assert kept.scorer.packing and kept.scorer.batch_invariant
    assert tiled(kept.scorer.backbone)
    fallen = _load(tiny_checkpoint, kernel=_raising_kernel, batch_invariant=True)
    assert not fallen.scorer.packing and not fallen.scorer.batch_invariant
    assert not tiled(fallen.scorer.backbone)  # plain nn.Linear layers again
    assert _score(fallen).scores == _score(padded_engine).scores


def test_fallback_check_passes_with_a_correct_kernel_and_logs_it(tiny_checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="rerank_core.varlen"):
        engine = _load(tiny_checkpoint)
    assert engine.packed_check_failure is None and engine.scorer.packing is True
    assert any("agree with padded passes" in r.getMessage() for r in caplog.records)


def test_fallback_tolerance_is_a_bf16_one_and_the_wrong_kernel_exceeds_it_widely(tiny_checkpoint):
    engine = _load(tiny_checkpoint, kernel=_top_left_causal_kernel)
    worst = float(engine.packed_check_failure.split("differ by ")[1].split(" ")[0])
    assert 1e-3 < SELF_CHECK_TOLERANCE <= 2e-2
    assert worst > 10 * SELF_CHECK_TOLERANCE


def test_fallback_when_torch_kernel_is_asked_for_on_cpu(tiny_checkpoint):
    """The real varlen kernel is CUDA-only: asked for on CPU, the engine says why and serves padded."""
    engine = _load(tiny_checkpoint, kernel=None)
    assert engine.packed_check_failure == "torch's varlen_attn runs on CUDA only, not on cpu"
    assert engine.scorer.packing is False


# --- configuration ---------------------------------------------------------------------------------


def test_varlen_path_is_the_packed_default_only_on_cuda_in_half_precision(reranker):
    config = EngineConfig()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert config.packed_attention_for(cuda, torch.bfloat16) == "varlen"
    assert config.packed_attention_for(cuda, torch.float16) == "varlen"
    assert config.packed_attention_for(cuda, torch.float32) == "segments"
    assert config.packed_attention_for(cpu, torch.bfloat16) == "segments"
    assert EngineConfig(packed_attention="segments").packed_attention_for(cuda, torch.bfloat16) == "segments"
    # Packing is on for CUDA in half precision (the varlen kernel), off in float32; on CPU the
    # engine uses per-segment SDPA.
    assert config.packed(cuda, torch.bfloat16) is True and config.packed(cuda, torch.float16) is True
    assert config.packed(cuda, torch.float32) is False and config.packed(cuda) is False
    assert EngineConfig(packing=True).packed(cuda, torch.float32) is True
    assert reranker.scorer.packed_attention is None and reranker.packed_check_failure is None


def test_varlen_config_rejects_unknown_attention():
    with pytest.raises(ValueError, match="packed_attention must be None or one of segments, varlen, got 'flash'"):
        EngineConfig(packed_attention="flash")


# --- the real kernel, where CUDA is present ---------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_varlen_flash_kernel_matches_the_reference_on_cuda():
    from torch.nn.attention.varlen import varlen_attn

    stores = [[(k.cuda().bfloat16(), v.cuda().bfloat16()) for k, v in _random_kv(8, seed=3)],
              [(k.cuda().bfloat16(), v.cuda().bfloat16()) for k, v in _random_kv(6, seed=4)]]
    g = torch.Generator().manual_seed(5)
    query = torch.randn(1, HEADS, 10, DIM, generator=g).cuda().bfloat16()
    key = torch.randn(1, KV_HEADS, 10, DIM, generator=g).cuda().bfloat16()
    value = torch.randn(1, KV_HEADS, 10, DIM, generator=g).cuda().bfloat16()
    module = SimpleNamespace(layer_idx=0)
    outputs = []
    for kernel in (varlen_attn, reference_varlen_attn):
        segments = _mixed_segments(stores)
        outputs.append(varlen_attention(module, query, key, value, VarlenPass(segments, build_layout(segments, "cuda"), kernel))[0])
    assert torch.allclose(outputs[0].float(), outputs[1].float(), atol=2e-2)


# --- bench/gpu.py's layout comparison, smoke-run on CPU with the stand-in kernel -------------------


@pytest.mark.slow
def test_varlen_bench_layouts_smoke_on_cpu(tiny_checkpoint, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", bench)  # dataclasses look their module up there
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script adds bench/ and the root
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "STAND_IN", True)
    out = bench.layouts(tiny_checkpoint, torch.device("cpu"), queries=2, docs=3, repeats=1, budgets=[200, 100_000])
    small, large = out["packed budget=200"], out["packed budget=100000"]
    assert small["path"] == large["path"] == "packed-varlen"
    assert out["padded budget=200"]["path"] == "padded"
    assert small["computed_tokens"] == small["tokens"] == large["tokens"]
    assert out["padded budget=100000"]["computed_tokens"] > out["padded budget=100000"]["tokens"]
    assert small["forward_passes"] > large["forward_passes"] == 2
    for row in (small, large):
        assert row["max_abs_diff_vs_padded"] <= SELF_CHECK_TOLERANCE
        assert row["pairs_per_s"] > 0 and row["tokens_per_s"] > 0 and row["peak_gib"] is None
    assert out["packed/padded budget=200"] > 0


def _older_torch_kernel(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    """varlen_attn as torch 2.9-2.11 define it: no ``enable_gqa``, so K/V heads must match."""
    assert k.shape[1] == q.shape[1] == v.shape[1], "this kernel form takes one K/V head per query head"
    return reference_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size)


def _causal_flag_kernel(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False):
    """A varlen kernel with a causal flag instead of a window (bottom-right aligned, as flash)."""
    assert k.shape[1] == q.shape[1]
    return reference_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, window_size=(-1, 0) if is_causal else (-1, -1))


@pytest.mark.parametrize("kernel", [_older_torch_kernel, _causal_flag_kernel], ids=["no-enable_gqa", "is_causal"])
def test_varlen_engine_with_older_kernel_signatures(tiny_checkpoint, reranker, kernel):
    """The tiny model has fewer K/V heads than query heads: they are repeated for such kernels."""
    engine = _load(tiny_checkpoint, kernel=kernel)
    assert engine.packed_check_failure is None
    assert isinstance(engine.scorer.packed_attention, VarlenAttention)
    _close(_score(engine).scores, _score(reranker).scores)
