"""vLLM's score shape: ``POST /score`` and ``/v1/score``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .common import MAX_INSTRUCTION_CHARS, Usage


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
