"""The bodies of search stacks' own dialects: Text Embeddings Inference (``texts`` on ``/rerank``),
Elasticsearch's ``hugging_face`` service, Weaviate's ``reranker-transformers`` module and
OpenSearch's ``default.rerank`` connector (docs/clients.md: each client's source)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from .common import CHUNKS_DESCRIPTION, _QueryNotBlank


class TeiRerankRequest(_QueryNotBlank):
    """``POST /rerank`` in Text Embeddings Inference's shape (a body with ``texts``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    query: str = Field(min_length=1, description="The search query.")
    texts: list[str] = Field(min_length=1, description="Texts to rank; an empty string is valid.")
    raw_scores: bool = Field(False, description="Scores as `logit_yes - logit_no` instead of probabilities.")
    return_text: bool = Field(False, description="Attach each text to its result.")
    truncate: bool | None = Field(
        None, description="false: a pair over max_length is an error (413); absent, null or true: truncate."
    )
    truncation_direction: Literal["Left", "Right"] = Field(
        "Right", description="Right cuts a long text's end (the model card); Left cuts its start."
    )
    # Not TEI's: Elasticsearch's hugging_face rerank service (8.19, 9.1) adds it to TEI's body.
    top_n: int | None = Field(None, ge=1, description="Return only the best `top_n` (default all).")


class TeiRank(BaseModel):
    index: int
    score: float
    text: str | None = None


def _tei_or(tag: str, other: type[BaseModel]):
    """A body that is TEI's when it names its documents ``texts``, else ``other``'s (whose errors
    then name what is missing)."""

    def shape(body: Any) -> str:
        if isinstance(body, dict):
            return "tei" if "texts" in body else tag
        return "tei" if isinstance(body, TeiRerankRequest) else tag

    return Annotated[Union[Annotated[other, Tag(tag)], Annotated[TeiRerankRequest, Tag("tei")]], Discriminator(shape)]




class ElasticRerankRequest(_QueryNotBlank):
    """``POST /elasticsearch/rerank`` with ``documents``: Elasticsearch's newer ``hugging_face`` body."""

    model_config = ConfigDict(extra="forbid", strict=True)

    query: str = Field(min_length=1, description="The search query.")
    documents: list[str] = Field(min_length=1, description="Texts to rank; an empty string is valid.")
    return_documents: bool = Field(False, description="Attach each text to its result (`text`).")
    top_n: int | None = Field(None, ge=1, description="Return only the best `top_n` (default all).")
    max_chunks_per_doc: int | None = Field(None, ge=1, description=CHUNKS_DESCRIPTION)


# Elasticsearch's hugging_face service posts TEI's `texts` in some versions, `documents` in others.
ElasticBody = _tei_or("elastic", ElasticRerankRequest)


class WeaviateRerankRequest(_QueryNotBlank):
    """``POST /weaviate/rerank``: what Weaviate's ``reranker-transformers`` module posts."""

    model_config = ConfigDict(extra="forbid", strict=True)

    query: str = Field(min_length=1, description="The search query.")
    documents: list[str] = Field(min_length=1, description="Texts to rank; an empty string is valid.")
    # Weaviate's client always marshals this field, empty: the documents already hold the text.
    property: str | None = Field(None, description="Accepted and ignored: Weaviate sends it empty.")


class WeaviateScore(BaseModel):
    document: str
    score: float


class WeaviateRerankResponse(BaseModel):
    """Scores in input order, as Weaviate pairs them with its objects by position."""

    query: str
    scores: list[WeaviateScore]


class OpenSearchRerankRequest(_QueryNotBlank):
    """``POST /opensearch/rerank``: the body an ml-commons connector's ``request_body`` template
    builds from what its rerank pre-process function sets (``query``, ``documents``, ``top_n``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    query: str = Field(min_length=1, description="The search query.")
    documents: list[str] = Field(min_length=1, description="Texts to rank; an empty string is valid.")
    top_n: int | None = Field(
        None, ge=1, description="Return only the best `top_n` (default all; OpenSearch's rerank processor needs all)."
    )
    model: str | None = Field(None, description="Configured model name (default model if omitted).")


class OpenSearchResult(BaseModel):
    index: int
    relevance_score: float
