"""The rerank shapes: this project's ``POST /rerank``, Jina / vLLM's ``POST /v1/rerank`` (also
Cohere v1's), and Cohere v2's ``POST /v2/rerank``."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from .common import (
    CHUNKS_DESCRIPTION,
    SPANS_DESCRIPTION,
    TRUNCATE_PROMPT_TOKENS_DESCRIPTION,
    Span,
    TextDocument,
    Usage,
    _check_prompt_tokens,
    _Request,
)
from .dialects import TeiRank, _tei_or


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


RerankBody = _tei_or("rerank", RerankRequest)
RerankAnswer = Union[RerankResponse, list[TeiRank]]
