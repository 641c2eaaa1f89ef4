"""The engine against the official procedure, and its public API."""

from __future__ import annotations

import pytest
import torch

from rerank_core import EngineConfig, QueryTooLongError, Reranker
from rerank_core.cpu import cpu_features, force_cpu_features
from tests.cpu_kinds import CPU_KINDS
from tests.reference import official_scores

QUERY = "What is the capital of China?"
DOCS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other.",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "",
    "def add(a, b):\n    return a + b  # ✓ 🚀",
    "   leading spaces and\ttabs\n\nand blank lines",
    "12345 numbers first, then words",
    "!!! punctuation first",
    "Paris est la capitale de la France. Берлин — столица Германии.",
]
LONG_DOC = " ".join(f"word{i} is part of a long passage about rivers and mountains." for i in range(60))


# (share_prefix, packing): every way the engine can run a forward pass.
LAYOUTS = [(True, True), (False, True), (True, False), (False, False)]
LAYOUT_IDS = ["packed-shared", "packed-full", "padded-shared", "padded-full"]


def _close(a, b, tol=1e-5):
    assert len(a) == len(b)
    worst = max(abs(x - y) for x, y in zip(a, b))
    assert worst <= tol, f"max difference {worst}"


def test_scores_are_spread_out_so_parity_is_meaningful(reranker):
    scores = reranker.score(QUERY, DOCS)
    assert max(scores) - min(scores) > 0.2
    assert all(0.0 < s < 1.0 for s in scores)


@pytest.mark.parametrize("share_prefix,packing", LAYOUTS, ids=LAYOUT_IDS)
def test_parity_with_official_procedure(official_model, tiny_checkpoint, share_prefix, packing):
    model, tokenizer = official_model
    engine = Reranker.load(
        str(tiny_checkpoint), device="cpu", dtype="float32",
        config=EngineConfig(share_prefix=share_prefix, packing=packing),
    )
    _close(engine.score(QUERY, DOCS), official_scores(model, tokenizer, QUERY, DOCS))


def test_parity_with_custom_instruction(reranker, official_model):
    model, tokenizer = official_model
    instruction = "Given a code question, retrieve code that answers it"
    _close(
        reranker.score("how to add numbers", DOCS, instruction=instruction),
        official_scores(model, tokenizer, "how to add numbers", DOCS, instruction=instruction),
    )


def test_parity_with_a_single_document(reranker, official_model):
    model, tokenizer = official_model
    _close(reranker.score("多语言查询：首都是哪里？", [DOCS[2]]), official_scores(model, tokenizer, "多语言查询：首都是哪里？", [DOCS[2]]))


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_parity_with_many_documents_across_batches(tiny_checkpoint, official_model, packing):
    model, tokenizer = official_model
    docs = [f"document {i}: " + " ".join(["river"] * (i % 17)) + DOCS[i % len(DOCS)] for i in range(70)]
    engine = Reranker.load(
        str(tiny_checkpoint), device="cpu", dtype="float32",
        config=EngineConfig(max_batch_tokens=400, max_batch_pairs=8, packing=packing),
    )
    result = engine.scorer.score([engine.encode(QUERY, docs)])
    assert result.stats.forward_passes > 5
    scores = result.scores[0]
    _close(scores, official_scores(model, tokenizer, QUERY, docs))


@pytest.mark.parametrize("share_prefix,packing", LAYOUTS, ids=LAYOUT_IDS)
def test_parity_when_documents_are_truncated(tiny_checkpoint, official_model, share_prefix, packing):
    model, tokenizer = official_model
    engine = Reranker.load(
        str(tiny_checkpoint), device="cpu", dtype="float32", max_length=160,
        config=EngineConfig(share_prefix=share_prefix, packing=packing),
    )
    docs = [LONG_DOC, DOCS[0], LONG_DOC[::-1], ""]
    encoded = engine.encode(QUERY, docs)
    assert encoded.truncated == [True, False, True, False]
    assert max(encoded.pair_lengths()) == 160
    _close(engine.score(QUERY, docs), official_scores(model, tokenizer, QUERY, docs, max_length=160))


@pytest.mark.parametrize("share_prefix,packing", LAYOUTS, ids=LAYOUT_IDS)
def test_score_does_not_depend_on_batch_companions(tiny_checkpoint, share_prefix, packing):
    engine = Reranker.load(
        str(tiny_checkpoint), device="cpu", dtype="float32",
        config=EngineConfig(share_prefix=share_prefix, max_batch_tokens=100_000, packing=packing),
    )
    alone = [engine.score(QUERY, [doc])[0] for doc in DOCS]
    together = engine.score(QUERY, DOCS + [LONG_DOC, LONG_DOC[:50]])[: len(DOCS)]
    _close(alone, together)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_queries_sharing_one_forward_pass_match_separate_calls(tiny_checkpoint, reranker, packing):
    other = "Which language is spoken in France?"
    engine = Reranker.load(
        str(tiny_checkpoint), device="cpu", dtype="float32", config=EngineConfig(max_padding=1.0, packing=packing)
    )
    result = engine.scorer.score([engine.encode(QUERY, DOCS), engine.encode(other, DOCS[::-1])])
    # Packed: both prefixes ride in the documents' pass. Padded: one prefix pass, one document pass.
    assert result.stats.forward_passes == (1 if packing else 2)
    mixed = result.scores
    _close(mixed[0], reranker.score(QUERY, DOCS))
    _close(mixed[1], reranker.score(other, DOCS[::-1]))


def test_rank_orders_by_score_with_documents_and_top_k(reranker):
    scores = reranker.score(QUERY, DOCS)
    ranked = reranker.rank(QUERY, DOCS, top_k=3, return_documents=True)
    expected = sorted(range(len(DOCS)), key=lambda i: (-scores[i], i))[:3]
    assert [r.index for r in ranked] == expected
    assert [r.relevance_score for r in ranked] == [scores[i] for i in expected]
    assert [r.document for r in ranked] == [DOCS[i] for i in expected]
    assert all(r.document is None for r in reranker.rank(QUERY, DOCS))
    assert len(reranker.rank(QUERY, DOCS, top_k=100)) == len(DOCS)


def test_ties_rank_lower_index_first(reranker):
    ranked = reranker.rank(QUERY, ["same text", "other text", "same text"])
    same = [r.index for r in ranked if r.index in (0, 2)]
    assert same == [0, 2]
    assert ranked[[r.index for r in ranked].index(0)].relevance_score == ranked[[r.index for r in ranked].index(2)].relevance_score


@pytest.mark.parametrize(
    "query,documents,kwargs,message",
    [
        ("", ["a"], {}, "query must be a non-empty string"),
        ("   ", ["a"], {}, "query must be a non-empty string"),
        (None, ["a"], {}, "query must be a non-empty string"),
        ("q", [], {}, "documents must not be empty"),
        ("q", "a single string", {}, "documents must be a list of strings"),
        ("q", ["a", 3], {}, r"documents\[1\] must be a string, got int"),
        ("q", ["a", None], {}, r"documents\[1\] must be a string, got NoneType"),
        ("q", ["a"], {"instruction": ""}, "instruction must be a non-empty string"),
        ("q", ["a"], {"top_k": 0}, "top_k must be a positive integer"),
        ("q", ["a"], {"top_k": -2}, "top_k must be a positive integer"),
        ("q", ["a"], {"top_k": True}, "top_k must be a positive integer"),
    ],
)
def test_bad_input_is_a_clear_value_error(reranker, query, documents, kwargs, message):
    with pytest.raises(ValueError, match=message):
        reranker.rank(query, documents, **kwargs)


def test_query_too_long_for_any_document(tiny_checkpoint):
    engine = Reranker.load(str(tiny_checkpoint), device="cpu", dtype="float32", max_length=120)
    with pytest.raises(QueryTooLongError, match="no room for a document within max_length=120"):
        engine.score("word " * 200, ["doc"])


def test_max_length_must_fit_the_template(tiny_checkpoint):
    with pytest.raises(ValueError, match="does not fit the prompt template"):
        Reranker.load(str(tiny_checkpoint), device="cpu", dtype="float32", max_length=20)


def test_health_check_passes_on_a_sound_model(reranker):
    reranker.check_health()


def test_packed_passes_compute_no_padding(reranker):
    result = reranker.scorer.score([reranker.encode(QUERY, DOCS + [LONG_DOC])])
    assert result.stats.forward_passes == 1  # the prefix and all documents in one row
    assert result.stats.padded_tokens == result.stats.tokens


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_packed_single_document_query(tiny_checkpoint, official_model, batch_invariant):
    """One pass; with batch invariance the prefix runs as a segment of its own, as for several documents."""
    model, tokenizer = official_model
    engine = Reranker.load(
        str(tiny_checkpoint), device="cpu", dtype="float32", config=EngineConfig(batch_invariant=batch_invariant)
    )
    result = engine.scorer.score([engine.encode(QUERY, [DOCS[0]])])
    assert result.stats.forward_passes == 1
    assert result.stats.tokens == len(engine.encode(QUERY, [DOCS[0]]).shared) + len(engine.encode(QUERY, [DOCS[0]]).documents[0])
    _close(result.scores[0], official_scores(model, tokenizer, QUERY, [DOCS[0]]))


def test_packed_engine_model_still_honours_padding_masks(reranker, official_model):
    """The packed attention implementation acts as SDPA for ordinary (2D-masked) calls."""
    model, tokenizer = official_model
    batch = tokenizer(["a short one", "a somewhat longer sentence with more tokens in it"],
                      padding=True, return_tensors="pt")
    assert reranker.scorer.backbone.config._attn_implementation != "sdpa"
    assert (batch["attention_mask"] == 0).any()
    with torch.inference_mode():
        got = reranker.scorer.backbone(**batch).last_hidden_state
        want = model.get_decoder()(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert torch.allclose(got[real], want[real], atol=1e-5)


@pytest.mark.parametrize(
    "budget, pairs, passes",
    [
        (8192, 64, 1),  # every prefix rides in the one pass of all documents
        (8192, 4, 4),  # prefixes ride in the first pass that needs them; later passes read the record
        (100, 64, None),  # no room beside the documents: prefixes run in passes of their own
    ],
)
def test_packed_queries_with_different_prefix_lengths(tiny_checkpoint, budget, pairs, passes):
    """Several queries' prefixes and their documents interleaved, under several budgets."""
    config = EngineConfig(packing=True, max_batch_tokens=budget, max_batch_pairs=pairs)
    engine = Reranker.load(str(tiny_checkpoint), device="cpu", dtype="float32", config=config)
    queries = [("q", DOCS[:3], None), (QUERY * 5, DOCS[3:], None), ("why?", DOCS[::2], "Find code answers")]
    encoded = [engine.encode(q, d, i) for q, d, i in queries]
    result = engine.scorer.score(encoded)
    if passes is not None:
        assert result.stats.forward_passes == passes
    # Each prefix computed once, whatever the layout.
    assert result.stats.tokens == sum(len(e.shared) + sum(map(len, e.documents)) for e in encoded)
    for (q, d, i), scores in zip(queries, result.scores):
        alone = [engine.scorer.score([engine.encode(q, [doc], i)]).scores[0][0] for doc in d]
        _close(scores, alone)


def test_auto_device_dtype_and_padding_on_cpu(reranker):
    config = EngineConfig()
    assert str(config.torch_device()) == "cpu"
    # bf16 where the CPU multiplies it natively, as torch reports; float32 elsewhere.
    import rerank_core.config as config_module

    for kind, dtype in (("AMX", torch.bfloat16), ("AVX512-BF16", torch.bfloat16), ("AVX-512", torch.float32),
                        ("AVX2", torch.float32)):
        with force_cpu_features(CPU_KINDS[kind]):
            assert config.torch_dtype() == dtype, kind
    # This CPU, as torch reports it (under a ceiling, such as scripts/test-cpu-kind's: never more).
    capabilities = torch.cpu.get_capabilities()
    reported = bool(capabilities["amx_bf16"] or capabilities["avx512_bf16"])
    if cpu_features().ceiling is None:
        assert config_module.cpu_has_native_bf16() == reported
    else:
        assert config_module.cpu_has_native_bf16() <= reported
    assert EngineConfig(dtype="float32").torch_dtype() == torch.float32
    assert reranker.scorer.batch_invariant is False  # an option: it costs about 15 % on CPU
    assert not config.invariant(torch.device("cpu")) and not config.invariant(torch.device("cuda"))
    assert EngineConfig(batch_invariant=True).invariant(torch.device("cpu"))
    assert reranker.scorer.max_padding == 0.1
    assert EngineConfig(max_padding=0.3).padding_share(torch.device("cpu")) == 0.3
    assert config.padding_share(torch.device("cuda")) == 0.5
    assert reranker.scorer.packing is True
    assert config.packed(torch.device("cuda"), torch.float32) is False
    assert config.packed(torch.device("cuda"), torch.bfloat16) is True
    assert EngineConfig(packing=False).packed(torch.device("cpu")) is False
    assert reranker.device.type == "cpu"
    assert reranker.scorer.head.weight.dtype == torch.float32
