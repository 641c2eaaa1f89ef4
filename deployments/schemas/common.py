"""What every shape shares: the query fields and their checks, option descriptions, usage,
spans, error bodies and the model list."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class TextDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class Span(BaseModel):
    """Characters ``[start, end)`` of a document's best window."""

    start: int
    end: int


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
