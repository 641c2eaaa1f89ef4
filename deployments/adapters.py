"""One internal request and result, and one small adapter per API shape.

Every route turns its body into a :class:`Job` (what to score and how), the ingress scores it
into a :class:`Scored`, and the route's adapter shapes that into its response. Adding a shape
means adding an adapter here, not a code path in the ingress.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from rerank_core import rank_indices

from . import schemas


@dataclass(frozen=True)
class Job:
    """What one request asks to score: (query, document) pairs and the options that apply.

    Attributes:
        queries, documents: one query per document (a rerank request repeats its one query);
            pairs with equal queries share their prompt prefix.
        model: the requested model name or alias; ``None`` for the default model.
        max_chunks_per_doc: windows per document (``None``: the model's default).
        max_tokens_per_doc: document budget cap per window.
        max_pair_tokens: cap on each whole pair (below the model's max_length).
        truncation_side: ``"right"`` cuts a document's end, ``"left"`` its start.
        truncate: ``False`` makes a document that does not fit its windows an error (413).
        return_spans: compute the character span of each document's best window.
    """

    queries: list[str]
    documents: list[str]
    model: str | None = None
    instruction: str | None = None
    max_chunks_per_doc: int | None = None
    max_tokens_per_doc: int | None = None
    max_pair_tokens: int | None = None
    truncation_side: str = "right"
    truncate: bool = True
    return_spans: bool = False

    @classmethod
    def rerank(cls, query: str, documents: list[str], **options) -> Job:
        """One query against every document."""
        return cls([query] * len(documents), documents, **options)


@dataclass(frozen=True)
class Scored:
    """The outcome of a :class:`Job`, per document in input order.

    Attributes:
        logits: ``logit_yes - logit_no`` of each document's best window.
        scores: the probabilities of "yes" of the same windows.
        spans: ``(start, end)`` of each best window, when asked for.
        tokens: tokens of every (query, window) sequence scored, as the model saw them.
    """

    model: str
    logits: list[float]
    scores: list[float]
    spans: list[tuple[int, int]] | None
    tokens: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def order(self, top_k: int | None = None) -> list[int]:
        """Document indices, highest score first, ties by lower index."""
        return rank_indices(self.scores, top_k)

    def span(self, i: int) -> schemas.Span | None:
        return None if self.spans is None else schemas.Span(start=self.spans[i][0], end=self.spans[i][1])

    def usage(self) -> schemas.Usage:
        return schemas.Usage(prompt_tokens=self.tokens, total_tokens=self.tokens)


def _pair_limit(truncate_prompt_tokens: int | None) -> int | None:
    """vLLM's ``truncate_prompt_tokens`` as a pair cap: -1 and absent mean the model's max_length."""
    return None if truncate_prompt_tokens in (None, -1) else truncate_prompt_tokens


def _cohere_meta(version: str, r: Scored, warnings: list[str] | None = None) -> schemas.CohereMeta:
    return schemas.CohereMeta(
        api_version=schemas.CohereApiVersion(version=version),
        billed_units=schemas.CohereBilledUnits(search_units=1),
        tokens=schemas.CohereTokens(input_tokens=r.tokens),
        warnings=warnings or [],
    )


# This project's shape: POST /rerank ------------------------------------------------------------


def rerank_job(body: schemas.RerankRequest) -> Job:
    return Job.rerank(body.query, body.documents, model=body.model, instruction=body.instruction,
                      max_chunks_per_doc=body.max_chunks_per_doc, return_spans=body.return_spans,
                      max_pair_tokens=_pair_limit(body.truncate_prompt_tokens))


def rerank_response(body: schemas.RerankRequest, r: Scored) -> schemas.RerankResponse:
    return schemas.RerankResponse(
        id=f"rerank-{r.id}",
        model=r.model,
        results=[
            schemas.RerankResult(index=i, relevance_score=r.scores[i], span=r.span(i),
                                 document=body.documents[i] if body.return_documents else None)
            for i in r.order(body.top_k)
        ],
        usage=r.usage(),
    )


# Jina / vLLM / Cohere v1: POST /v1/rerank -----------------------------------------------------


def jina_job(body: schemas.JinaRerankRequest) -> Job:
    return Job.rerank(body.query, body.texts(), model=body.model, instruction=body.instruction,
                      max_chunks_per_doc=body.max_chunks_per_doc, return_spans=body.return_spans,
                      max_pair_tokens=_pair_limit(body.truncate_prompt_tokens),
                      max_tokens_per_doc=body.max_tokens_per_doc, truncation_side=body.truncation_side)


def jina_response(body: schemas.JinaRerankRequest, r: Scored) -> schemas.JinaRerankResponse:
    texts = body.texts()
    return schemas.JinaRerankResponse(
        id=f"rerank-{r.id}",
        model=r.model,
        usage=r.usage(),
        results=[
            schemas.JinaResult(
                index=i,
                relevance_score=r.scores[i],
                span=r.span(i),
                document=schemas.TextDocument(text=texts[i]) if body.return_documents else None,
            )
            # top_n absent or 0 returns all, as in vLLM.
            for i in r.order(body.top_n or None)
        ],
        meta=_cohere_meta("1", r),
    )


# Cohere v2: POST /v2/rerank -------------------------------------------------------------------

COHERE_NO_EFFECT = ("priority", "relevant_spans")


def cohere_job(body: schemas.CohereRerankRequest) -> Job:
    return Job.rerank(body.query, body.documents, model=body.model, max_tokens_per_doc=body.max_tokens_per_doc,
                      max_chunks_per_doc=body.max_chunks_per_doc)


def cohere_response(body: schemas.CohereRerankRequest, r: Scored) -> schemas.CohereRerankResponse:
    warnings = [
        f"{field} is accepted but has no effect on this server"
        for field in COHERE_NO_EFFECT
        if getattr(body, field) is not None
    ]
    return schemas.CohereRerankResponse(
        id=f"rerank-{r.id}",
        results=[
            schemas.CohereResult(index=i, relevance_score=r.scores[i], document=(
                schemas.TextDocument(text=body.documents[i]) if body.return_documents else None))
            for i in r.order(body.top_n)
        ],
        meta=_cohere_meta("2", r, warnings),
    )


# Text Embeddings Inference: POST /rerank with `texts` -----------------------------------------


def tei_job(body: schemas.TeiRerankRequest) -> Job:
    return Job.rerank(body.query, body.texts, truncate=body.truncate is not False,
                      truncation_side=body.truncation_direction.lower())


def tei_response(body: schemas.TeiRerankRequest, r: Scored) -> list[schemas.TeiRank]:
    values = r.logits if body.raw_scores else r.scores
    return [
        schemas.TeiRank(index=i, score=values[i], text=body.texts[i] if body.return_text else None)
        for i in r.order(body.top_n)
    ]


# Elasticsearch hugging_face: POST /elasticsearch/rerank with `documents` ---------------------
# (its `texts` body is TEI's, served by tei_job / tei_response)


def elastic_job(body: schemas.ElasticRerankRequest) -> Job:
    return Job.rerank(body.query, body.documents, max_chunks_per_doc=body.max_chunks_per_doc)


def elastic_response(body: schemas.ElasticRerankRequest, r: Scored) -> list[schemas.TeiRank]:
    """A bare array, best first: the only shape Elasticsearch's parser reads (it rejects unknown keys)."""
    return [
        schemas.TeiRank(index=i, score=r.scores[i], text=body.documents[i] if body.return_documents else None)
        for i in r.order(body.top_n)
    ]


# Weaviate reranker-transformers: POST /weaviate/rerank ----------------------------------------


def weaviate_job(body: schemas.WeaviateRerankRequest) -> Job:
    return Job.rerank(body.query, body.documents)


def weaviate_response(body: schemas.WeaviateRerankRequest, r: Scored) -> schemas.WeaviateRerankResponse:
    """Input order: Weaviate concatenates its batches' scores and pairs them with objects by position."""
    return schemas.WeaviateRerankResponse(
        query=body.query,
        scores=[schemas.WeaviateScore(document=d, score=s) for d, s in zip(body.documents, r.scores)],
    )


# OpenSearch ml-commons, post-process function default.rerank: POST /opensearch/rerank ---------


def opensearch_job(body: schemas.OpenSearchRerankRequest) -> Job:
    return Job.rerank(body.query, body.documents, model=body.model)


def opensearch_response(body: schemas.OpenSearchRerankRequest, r: Scored) -> list[schemas.OpenSearchResult]:
    """A bare array, best first: ``default.rerank`` reads ``$[*]`` and puts each score at its index."""
    return [schemas.OpenSearchResult(index=i, relevance_score=r.scores[i]) for i in r.order(body.top_n)]


# vLLM score: POST /score, /v1/score -----------------------------------------------------------


def score_job(body: schemas.ScoreRequest) -> Job:
    queries, documents = body.pairs()
    return Job(queries, documents, model=body.model, instruction=body.instruction,
               max_pair_tokens=_pair_limit(body.truncate_prompt_tokens))


def score_response(body: schemas.ScoreRequest, r: Scored) -> schemas.ScoreResponse:
    return schemas.ScoreResponse(
        id=f"score-{r.id}",
        created=r.created,
        model=r.model,
        data=[schemas.ScoreData(index=i, score=score) for i, score in enumerate(r.scores)],
        usage=r.usage(),
    )
