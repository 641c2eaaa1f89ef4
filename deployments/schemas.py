"""HTTP request and response bodies of the rerank and score routes.

* ``POST /rerank``: this project's own shape, or TEI's (a body with ``texts``).
* ``POST /v1/rerank``: the Jina / vLLM shape (documents as strings or ``{text}``, documents
  returned by default).
* ``POST /v2/rerank``: the Cohere v2 shape, as the official ``cohere`` SDK sends it.
* ``POST /score``, ``POST /v1/score``: vLLM's score API ((query, document) pairs, 1:N or N:N).
* ``POST /elasticsearch/rerank``: Elasticsearch's ``hugging_face`` rerank service (both of its
  bodies: ``texts`` as TEI, or ``documents``), answered by a bare array as TEI does.
* ``POST /weaviate/rerank``: Weaviate's ``reranker-transformers`` inference container.

Fields a known client sends that have no effect here are accepted and say so in their
description (docs/clients.md names the client that sends each).

Unknown fields are rejected (422) so that a misspelled option never silently does nothing, and
numbers and booleans are strict (``"2"`` is not an integer, ``"yes"`` not a boolean): a value that
had to be guessed at is an error, not a silent conversion. An error names the field as the client
spelled it (``top_k`` or its alias ``top_n``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    Tag,
    field_validator,
    model_validator,
)

MAX_INSTRUCTION_CHARS = 4096
CHUNKS_DESCRIPTION = (
    "Score a long document as up to this many windows of the document budget and keep the best "
    "(default: the model's `max_chunks_per_doc`, 1: the document's start, as the model card truncates)."
)
SPANS_DESCRIPTION = "Attach `span: {start, end}`, the characters of each document's best window."


class _QueryNotBlank(BaseModel):
    """A body with a ``query`` that must hold more than white space."""

    @model_validator(mode="after")
    def _query_not_blank(self):
        if not self.query.strip():
            raise ValueError("query must not be blank")
        return self


class _Request(_QueryNotBlank):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    query: str = Field(min_length=1, description="The search query.")
    model: str | None = Field(None, description="Configured model name (default model if omitted).")
    instruction: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_INSTRUCTION_CHARS,
        description="Task instruction for the prompt; default: the web search instruction.",
    )


TRUNCATE_PROMPT_TOKENS_DESCRIPTION = (
    "Most tokens per (query, document) prompt, as in vLLM (Milvus's vllm ranker sends it); the "
    "document's end is cut, the template survives. -1 or absent: the model's max_length."
)


def _check_prompt_tokens(value: int | None) -> int | None:
    if value == 0:
        raise ValueError("truncate_prompt_tokens must be -1 or at least 1")
    return value


class RerankRequest(_Request):
    """``POST /rerank``."""

    documents: list[str] = Field(min_length=1, description="Texts to rank; an empty string is valid.")
    # `top_k` is the seed's name, `top_n` the name other rerank APIs use; both mean the same, and
    # an error names whichever the client sent.
    top_k: int | None = Field(
        None,
        ge=1,
        strict=True,
        validation_alias=AliasChoices("top_k", "top_n"),
        description="Return this many results (alias `top_n`; default all).",
    )
    return_documents: bool = Field(False, strict=True, description="Attach each document's text to its result.")
    max_chunks_per_doc: StrictInt | None = Field(None, ge=1, description=CHUNKS_DESCRIPTION)
    return_spans: StrictBool = Field(False, description=SPANS_DESCRIPTION)
    truncate_prompt_tokens: StrictInt | None = Field(None, ge=-1, description=TRUNCATE_PROMPT_TOKENS_DESCRIPTION)

    _prompt_tokens = field_validator("truncate_prompt_tokens")(_check_prompt_tokens)

    @model_validator(mode="before")
    @classmethod
    def _top_k_or_top_n(cls, data):
        if isinstance(data, dict) and "top_k" in data and "top_n" in data:
            raise ValueError("give top_k or top_n, not both")
        return data


class TextDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str


class JinaRerankRequest(_Request):
    """``POST /v1/rerank`` (Jina / vLLM)."""

    documents: list[str | TextDocument] = Field(min_length=1, description="Strings or `{text}` objects.")
    top_n: int | None = Field(
        None, ge=0, strict=True, description="Return this many results; absent or 0 means all (as in vLLM)."
    )
    return_documents: bool = Field(True, strict=True, description="Attach `document: {text}` to each result.")
    max_chunks_per_doc: StrictInt | None = Field(None, ge=1, description=CHUNKS_DESCRIPTION)
    return_spans: StrictBool = Field(False, description=SPANS_DESCRIPTION)
    truncate_prompt_tokens: StrictInt | None = Field(None, ge=-1, description=TRUNCATE_PROMPT_TOKENS_DESCRIPTION)
    # vLLM's options, which LiteLLM's hosted_vllm rerank forwards when its caller sets them.
    max_tokens_per_doc: StrictInt | None = Field(
        None, ge=1, description="Cut each document to this many tokens (and to max_length)."
    )
    truncation_side: Literal["left", "right"] = Field(
        "right", description="right cuts a long document's end (the model card); left cuts its start."
    )

    _prompt_tokens = field_validator("truncate_prompt_tokens")(_check_prompt_tokens)

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class CohereRerankRequest(BaseModel):
    """``POST /v2/rerank`` (Cohere v2, as the official SDK posts it)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="Configured model name.")
    query: str = Field(min_length=1)
    documents: list[str] = Field(min_length=1)
    top_n: int | None = Field(None, ge=1, strict=True, description="Return this many results (default all).")
    max_tokens_per_doc: int | None = Field(
        None, ge=1, strict=True, description="Cut each document to this many tokens (and to max_length)."
    )
    max_chunks_per_doc: StrictInt | None = Field(None, ge=1, description=CHUNKS_DESCRIPTION)
    priority: int | None = Field(None, strict=True, description="Accepted for SDK compatibility; has no effect.")
    relevant_spans: dict[str, Any] | None = Field(
        None, description="Accepted for SDK compatibility; spans are not produced (a warning says so)."
    )
    # Weaviate's reranker-cohere module always sends `return_documents: false`.
    return_documents: StrictBool = Field(False, description="Attach `document: {text}` to each result.")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class Span(BaseModel):
    """Characters ``[start, end)`` of a document's best window."""

    start: int
    end: int


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: str | None = None
    span: Span | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: Usage


class JinaResult(BaseModel):
    index: int
    relevance_score: float
    document: TextDocument | None = None
    span: Span | None = None


class JinaRerankResponse(BaseModel):
    """Jina / vLLM's answer, with Cohere v1's ``meta`` so that ``cohere.Client`` reads it too."""

    id: str
    model: str
    usage: Usage
    results: list[JinaResult]
    meta: CohereMeta


class CohereResult(BaseModel):
    index: int
    relevance_score: float
    document: TextDocument | None = None


class CohereApiVersion(BaseModel):
    version: str


class CohereBilledUnits(BaseModel):
    search_units: int


class CohereTokens(BaseModel):
    input_tokens: int
    output_tokens: int = 0


class CohereMeta(BaseModel):
    api_version: CohereApiVersion
    billed_units: CohereBilledUnits
    tokens: CohereTokens
    warnings: list[str] = Field(default_factory=list)


class CohereRerankResponse(BaseModel):
    id: str
    results: list[CohereResult]
    meta: CohereMeta


class ErrorBody(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    """An error: ``{"error": {"message", "type", "code"}}``; Cohere's routes add ``message``."""

    error: ErrorBody
    message: str | None = Field(None, description="On /v1/rerank and /v2/rerank: Cohere's error field.")


class StringErrorResponse(BaseModel):
    """An error of the routes whose clients read ``error`` as a string (TEI's error body)."""

    error: str
    error_type: str


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    owned_by: str = "qwen3-rerank-serve"
    aliases: list[str]
    max_length: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


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


RerankBody = _tei_or("rerank", RerankRequest)
RerankAnswer = Union[RerankResponse, list[TeiRank]]


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


class ScoreRequest(BaseModel):
    """``POST /score`` and ``/v1/score`` (vLLM): one query and N documents, or N (query, document) pairs.

    Each side is a string or a list of strings, named ``text_1``/``text_2`` or ``queries``/``documents``.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="Configured model name (default model if omitted).")
    text_1: str | list[str] | None = Field(None, description="The query, or one query per pair.")
    text_2: str | list[str] | None = Field(None, description="The documents, one per pair.")
    queries: str | list[str] | None = Field(None, description="Same as `text_1`.")
    documents: str | list[str] | None = Field(None, description="Same as `text_2`.")
    instruction: str | None = Field(
        None, min_length=1, max_length=MAX_INSTRUCTION_CHARS,
        description="Task instruction for the prompt; default: the web search instruction.",
    )
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, description="Most tokens per (query, document) prompt; the document's end is cut, "
        "the template survives. -1 or absent: the model's max_length.",
    )

    @model_validator(mode="after")
    def _pairs(self):
        vllm_names = (self.text_1, self.text_2)
        other_names = (self.queries, self.documents)
        if not (None not in vllm_names and other_names == (None, None)
                or None not in other_names and vllm_names == (None, None)):
            raise ValueError("give text_1 and text_2, or queries and documents")
        if self.truncate_prompt_tokens == 0:
            raise ValueError("truncate_prompt_tokens must be -1 or at least 1")
        queries, documents = self._sides()
        if not queries or not documents:
            raise ValueError("the query and document lists must not be empty")
        if len(queries) != 1 and len(queries) != len(documents):
            raise ValueError(
                f"{len(queries)} queries and {len(documents)} documents: give one query, or one query per document"
            )
        for query in queries:
            if not query.strip():
                raise ValueError("queries must not be blank")
        return self

    def _sides(self) -> tuple[list[str], list[str]]:
        first = self.text_1 if self.text_1 is not None else self.queries
        second = self.text_2 if self.text_2 is not None else self.documents
        return ([first] if isinstance(first, str) else first), ([second] if isinstance(second, str) else second)

    def pairs(self) -> tuple[list[str], list[str]]:
        """``(queries, documents)`` of equal length: one query is paired with every document."""
        queries, documents = self._sides()
        return (queries * len(documents) if len(queries) == 1 else queries), documents


class ScoreData(BaseModel):
    index: int
    object: str = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: Usage
