"""Long documents as windows: the definition, each window against the model card, the best one wins."""

from __future__ import annotations

import pytest

from rerank_core import EngineConfig, Reranker, probabilities
from rerank_core.windows import window_bounds
from tests.reference import official_scores, official_scores_of_bodies, window_body
from tests.test_engine import DOCS, QUERY

MAX_LENGTH = 160
# About 600 tokens with distinct words, so that each window reads different text.
LONG = " ".join(f"Paragraph {i} tells of river {i} and the mountain town number {i * 7}." for i in range(45))
SHORT = "The capital of China is Beijing."


def _close(a, b, tol=1e-5):
    assert len(a) == len(b)
    worst = max(abs(x - y) for x, y in zip(a, b))
    assert worst <= tol, f"max difference {worst}"


@pytest.fixture(scope="module")
def windowed_engine(tiny_checkpoint):
    """An engine with a short max_length, so that LONG needs several windows."""
    return Reranker.load(
        str(tiny_checkpoint), device="cpu", dtype="float32", max_length=MAX_LENGTH,
        config=EngineConfig(max_chunks_per_doc=3, chunk_overlap_tokens=10),
    )


def _doc_ids(engine, document):
    return engine.encoder.tokenizer.encode(" " + document, add_special_tokens=False)


@pytest.mark.parametrize(
    "args,expected",
    [
        ((10, 4, 0, 5), [(0, 4), (4, 8), (8, 10)]),
        ((10, 4, 1, 5), [(0, 4), (3, 7), (6, 10)]),
        ((10, 4, 1, 2), [(0, 4), (3, 7)]),  # the cap drops tokens past the last window
        ((8, 4, 0, 5), [(0, 4), (4, 8)]),  # no empty window after a document ending on a boundary
        ((4, 4, 3, 5), [(0, 4)]),  # at most W tokens: one window
        ((3, 4, 0, 1), [(0, 3)]),
        ((10, 4, 1, 5, "left"), [(6, 10), (3, 7), (0, 4)]),
    ],
)
def test_window_bounds_follow_the_definition(args, expected):
    assert window_bounds(*args) == expected


@pytest.mark.parametrize("args", [(10, 4, 4, 2), (10, 4, -1, 2), (10, 0, 0, 2), (10, 4, 0, 0), (10, 4, 0, 2, "up")])
def test_window_bounds_reject_bad_settings(args):
    with pytest.raises(ValueError):
        window_bounds(*args)


def test_overlap_matters_only_when_a_second_window_is_taken():
    assert window_bounds(4, 4, 9, 3) == [(0, 4)]


def test_each_window_scores_as_the_model_card_on_its_ids(windowed_engine, official_model):
    model, tokenizer = official_model
    windowed = windowed_engine.encode_windows(QUERY, [LONG, SHORT], max_chunks_per_doc=3)
    width = MAX_LENGTH - len(windowed.encoded.shared) - len(windowed_engine.encoder.suffix_ids)
    ids = _doc_ids(windowed_engine, LONG)
    bounds = window_bounds(len(ids), width, 10, 3)
    assert len(bounds) == 3 and bounds[1][0] == width - 10  # window k starts at k * (W - overlap)
    assert windowed.document_of == [0, 0, 0, 1]
    row_logits = windowed_engine.scorer.score([windowed.encoded]).logits[0]
    bodies = [window_body(tokenizer, QUERY, LONG, a, b) for a, b in bounds]
    bodies.append(window_body(tokenizer, QUERY, SHORT, 0, len(_doc_ids(windowed_engine, SHORT))))
    _close(probabilities(row_logits), official_scores_of_bodies(model, tokenizer, bodies))
    # The document's score is its best window's.
    result = windowed.best(row_logits)
    assert result.logits[0] == max(row_logits[:3]) and result.windows == [3, 1]
    assert result.best_windows[0] == row_logits[:3].index(max(row_logits[:3]))
    assert windowed_engine.score(QUERY, [LONG, SHORT]) == result.scores()


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_windows_match_the_model_card_in_every_layout(tiny_checkpoint, official_model, packing):
    model, tokenizer = official_model
    engine = Reranker.load(
        str(tiny_checkpoint), device="cpu", dtype="float32", max_length=MAX_LENGTH,
        config=EngineConfig(max_chunks_per_doc=4, packing=packing, max_batch_tokens=300),
    )
    windowed = engine.encode_windows(QUERY, [LONG, LONG[::-1]])
    width = MAX_LENGTH - len(windowed.encoded.shared) - len(engine.encoder.suffix_ids)
    bodies = [
        window_body(tokenizer, QUERY, doc, a, b)
        for doc in (LONG, LONG[::-1])
        for a, b in window_bounds(len(_doc_ids(engine, doc)), width, 0, 4)
    ]
    assert len(bodies) == 8
    logits = engine.scorer.score([windowed.encoded]).logits[0]
    _close(probabilities(logits), official_scores_of_bodies(model, tokenizer, bodies))


def test_one_chunk_is_todays_truncated_score_exactly(windowed_engine, reranker, official_model, tiny_checkpoint):
    model, tokenizer = official_model
    one = windowed_engine.score(QUERY, [LONG, SHORT] + DOCS, max_chunks_per_doc=1)
    today = Reranker.load(str(tiny_checkpoint), device="cpu", dtype="float32", max_length=MAX_LENGTH)
    assert today.config.max_chunks_per_doc == 1
    assert one == today.score(QUERY, [LONG, SHORT] + DOCS)
    assert one == today.score_encoded([today.encode(QUERY, [LONG, SHORT] + DOCS)])[0]
    _close(one, official_scores(model, tokenizer, QUERY, [LONG, SHORT] + DOCS, max_length=MAX_LENGTH))
    # Window 0 of a chunked document is the model card's truncated document, token for token.
    windowed = windowed_engine.encode_windows(QUERY, [LONG])
    assert windowed.encoded.documents[0] == today.encode(QUERY, [LONG]).documents[0]


def test_a_document_within_the_budget_has_one_window(windowed_engine):
    windowed = windowed_engine.encode_windows(QUERY, DOCS, max_chunks_per_doc=5)
    assert windowed.document_of == list(range(len(DOCS)))
    assert windowed_engine.score(QUERY, DOCS, max_chunks_per_doc=5) == windowed_engine.score(
        QUERY, DOCS, max_chunks_per_doc=1
    )


def test_best_window_raises_a_long_documents_score(windowed_engine):
    one = windowed_engine.score(QUERY, [LONG], max_chunks_per_doc=1, raw_scores=True)[0]
    many = windowed_engine.score_windowed(windowed_engine.encode_windows(QUERY, [LONG], max_chunks_per_doc=6))
    assert many.windows == [6]
    assert many.logits[0] >= one
    assert many.tokens == windowed_engine.encode_windows(QUERY, [LONG], max_chunks_per_doc=6).encoded.num_tokens()


def test_overlap_is_honoured(windowed_engine):
    windowed = windowed_engine.encode_windows(QUERY, [LONG])
    rows = [row[: -len(windowed_engine.encoder.suffix_ids)] for row in windowed.encoded.documents]
    assert len(rows) == 3
    for left, right in zip(rows, rows[1:]):
        assert left[-10:] == right[:10]
    assert rows[0] + rows[1][10:] + rows[2][10:] == _doc_ids(windowed_engine, LONG)[: len(rows[0]) * 3 - 20]


def test_max_tokens_per_doc_sets_the_window_width(windowed_engine, official_model):
    model, tokenizer = official_model
    windowed = windowed_engine.encode_windows(QUERY, [LONG], max_tokens_per_doc=30, max_chunks_per_doc=4)
    rows = [row[: -len(windowed_engine.encoder.suffix_ids)] for row in windowed.encoded.documents]
    assert [len(r) for r in rows] == [30, 30, 30, 30]
    ids = _doc_ids(windowed_engine, LONG)
    assert rows[2] == ids[40:70]  # stride W - overlap = 20
    logits = windowed_engine.scorer.score([windowed.encoded]).logits[0]
    bodies = [window_body(tokenizer, QUERY, LONG, 20 * k, 20 * k + 30) for k in range(4)]
    _close(probabilities(logits), official_scores_of_bodies(model, tokenizer, bodies))


def test_spans_point_at_each_windows_text(windowed_engine):
    text = "Ünïcode first — then " + LONG
    windowed = windowed_engine.encode_windows(QUERY, [text, SHORT], return_spans=True)
    tokenizer = windowed_engine.encoder.tokenizer
    suffix = len(windowed_engine.encoder.suffix_ids)
    assert windowed.document_of == [0, 0, 0, 1]
    for row, (start, end) in zip(windowed.encoded.documents[:3], windowed.spans[:3]):
        assert text[start:end].strip() == tokenizer.decode(row[:-suffix]).strip()
    assert windowed.spans[0][0] == 0 and windowed.spans[1][0] > 0
    assert windowed.spans[3] == (0, len(SHORT))
    ranked = windowed_engine.rank(QUERY, [text, SHORT], return_spans=True)
    best = windowed_engine.score_windowed(windowed_engine.encode_windows(QUERY, [text, SHORT], return_spans=True))
    assert {r.index: r.span for r in ranked} == dict(enumerate(best.spans))


def test_left_truncation_keeps_the_documents_end(windowed_engine, official_model):
    model, tokenizer = official_model
    windowed = windowed_engine.encode_windows(QUERY, [LONG], max_chunks_per_doc=1, truncation_side="left")
    ids = _doc_ids(windowed_engine, LONG)
    width = MAX_LENGTH - len(windowed.encoded.shared) - len(windowed_engine.encoder.suffix_ids)
    assert windowed.encoded.documents[0] == ids[-width:] + windowed_engine.encoder.suffix_ids
    assert windowed.encoded.truncated == [True]
    logits = windowed_engine.scorer.score([windowed.encoded]).logits[0]
    body = window_body(tokenizer, QUERY, LONG, len(ids) - width, len(ids))
    _close(probabilities(logits), official_scores_of_bodies(model, tokenizer, [body]))


def test_overlap_not_below_the_budget_is_a_clear_error(tiny_checkpoint):
    engine = Reranker.load(
        str(tiny_checkpoint), device="cpu", dtype="float32", max_length=MAX_LENGTH,
        config=EngineConfig(max_chunks_per_doc=2, chunk_overlap_tokens=100),
    )
    with pytest.raises(ValueError, match="chunk overlap .100 tokens. must be .* below the document budget"):
        engine.score(QUERY, [LONG])
    # One window, or documents that fit one: the overlap plays no part.
    assert len(engine.score(QUERY, [LONG], max_chunks_per_doc=1)) == 1
    assert len(engine.score(QUERY, DOCS)) == len(DOCS)


@pytest.mark.parametrize(
    "kwargs", [{"max_chunks_per_doc": 0}, {"chunk_overlap_tokens": -1}, {"chunk_overlap_tokens": 8192}]
)
def test_engine_config_bounds(kwargs):
    with pytest.raises(ValueError):
        EngineConfig(**kwargs)


@pytest.mark.parametrize("value", [0, -1, True, "2", 1.5])
def test_bad_max_chunks_per_doc_is_a_clear_error(reranker, value):
    with pytest.raises(ValueError, match="max_chunks_per_doc must be a positive integer"):
        reranker.score(QUERY, DOCS, max_chunks_per_doc=value)


def test_score_pairs_groups_by_query_and_matches_score(windowed_engine):
    other = "Which rivers flow through towns?"
    pairs = [(QUERY, SHORT), (other, LONG), (QUERY, LONG), (other, DOCS[1]), (QUERY, DOCS[2])]
    got = windowed_engine.score_pairs(pairs)
    for (query, document), score in zip(pairs, got):
        assert score == pytest.approx(windowed_engine.score(query, [document])[0], abs=1e-6)
    raw = windowed_engine.score_pairs(pairs, raw_scores=True)
    assert probabilities(raw) == got
    with pytest.raises(ValueError, match="pairs must be a non-empty list"):
        windowed_engine.score_pairs([])
    with pytest.raises(ValueError, match=r"pairs\[1\] must be a \(query, document\) pair"):
        windowed_engine.score_pairs([(QUERY, SHORT), (QUERY,)])
