"""HTTP request and response bodies of the three rerank routes.

* ``POST /rerank``: this project's own shape.
* ``POST /v1/rerank``: the Jina / vLLM shape (documents as strings or ``{text}``, documents
  returned by default).
* ``POST /v2/rerank``: the Cohere v2 shape, as the official ``cohere`` SDK sends it.

Unknown fields are rejected (422) so that a misspelled option never silently does nothing, and
numbers and booleans are strict (``"2"`` is not an integer, ``"yes"`` not a boolean): a value that
had to be guessed at is an error, not a silent conversion. An error names the field as the client
spelled it (``top_k`` or its alias ``top_n``).
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

MAX_INSTRUCTION_CHARS = 4096


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    query: str = Field(min_length=1, description="The search query.")
    model: str | None = Field(None, description="Configured model name (default model if omitted).")
    instruction: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_INSTRUCTION_CHARS,
        description="Task instruction for the prompt; default: the web search instruction.",
    )

    @model_validator(mode="after")
    def _query_not_blank(self):
        if not self.query.strip():
            raise ValueError("query must not be blank")
        return self


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
    priority: int | None = Field(None, strict=True, description="Accepted for SDK compatibility; has no effect.")
    relevant_spans: dict[str, Any] | None = Field(
        None, description="Accepted for SDK compatibility; spans are not produced (a warning says so)."
    )


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: str | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: Usage


class JinaResult(BaseModel):
    index: int
    relevance_score: float
    document: TextDocument | None = None


class JinaRerankResponse(BaseModel):
    id: str
    model: str
    usage: Usage
    results: list[JinaResult]


class CohereResult(BaseModel):
    index: int
    relevance_score: float


class CohereApiVersion(BaseModel):
    version: str = "2"


class CohereBilledUnits(BaseModel):
    search_units: int


class CohereTokens(BaseModel):
    input_tokens: int
    output_tokens: int = 0


class CohereMeta(BaseModel):
    api_version: CohereApiVersion = Field(default_factory=CohereApiVersion)
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
    """Every error: ``{"error": {"message", "type", "code"}}``."""

    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    owned_by: str = "qwen3-rerank-serve"
    aliases: list[str]
    max_length: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
