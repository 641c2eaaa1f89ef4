"""Long inputs: documents past max_length are cut as the model defines; an oversized query is a 422."""

from __future__ import annotations

import pytest
from ray import serve

from deployments.app import build_app
from rerank_core import Reranker
from tests.service_helpers import app_args, close, post
from tests.test_engine import QUERY

MAX_LENGTH = 256


@pytest.fixture(scope="module")
def short_service(ray_cluster, tiny_checkpoint):
    args = app_args(tiny_checkpoint, model={"max_length": MAX_LENGTH}, max_request_chars=2_000_000,
                    max_body_bytes=4_000_000)
    serve.run(build_app(args), name="long", route_prefix="/long")
    yield f"{ray_cluster}/long"
    serve.delete("long")


def test_document_far_longer_than_max_length_is_truncated_and_scored(short_service, tiny_checkpoint):
    engine = Reranker.load(str(tiny_checkpoint), device="cpu", dtype="float32", max_length=MAX_LENGTH)
    long_doc = "The Yangtze flows east through many provinces. " * 20_000  # ~1M characters
    docs = [long_doc, long_doc[:5000], "short"]
    encoded = engine.encode(QUERY, docs)
    assert encoded.truncated == [True, True, False]
    assert max(encoded.pair_lengths()) == MAX_LENGTH
    r = post(f"{short_service}/rerank", {"query": QUERY, "documents": docs})
    assert r.status_code == 200, r.text[:300]
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    close([got[i] for i in range(3)], engine.score(QUERY, docs))
    # Both long documents share their first MAX_LENGTH tokens, so the cut makes them score alike.
    assert got[0] == pytest.approx(got[1], abs=1e-6)


def test_query_with_no_room_for_a_document_is_a_clear_422(short_service):
    r = post(f"{short_service}/rerank", {"query": "rivers " * 400, "documents": ["a"]})
    assert r.status_code == 422
    message = r.json()["error"]["message"]
    assert "leaves no room for a document" in message and f"max_length={MAX_LENGTH}" in message
