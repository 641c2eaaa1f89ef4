"""Prompt building and tokenization for Qwen3-Reranker, with no torch in sight.

The released checkpoints judge a pair by answering "yes" or "no" to a fixed chat prompt:

    PREFIX + "<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {document}" + SUFFIX

The official procedure tokenizes the body alone, cuts it at its tail so that
prefix + body + suffix fits ``max_length``, and concatenates the three id lists.

This module produces the same ids, split in two so that the forward pass can reuse work:
the *shared* part (prefix + instruction + query + ``"<Document>:"``) is identical for every
document of one query, and each *document* part is ``" {document}"`` (tail-truncated) followed
by the suffix. The split falls after ``"<Document>:"`` and before the space: Qwen's
pre-tokenizer never merges ``":"`` with a following space, so the concatenation of the two
tokenizations equals the tokenization of the whole body.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .batching import plan_batches
from .windows import WindowedQuery, char_span, window_bounds

PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
DEFAULT_MAX_LENGTH = 8192


def body_text(query: str, document: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The user-turn body of the official template for one pair."""
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


def _shared_body_text(query: str, instruction: str) -> str:
    # body_text() minus the " {document}" tail; see the module docstring for why the split is here.
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>:"


class QueryTooLongError(ValueError):
    """The prompt template, instruction and query leave no room for any document."""


@dataclass(frozen=True)
class EncodedQuery:
    """Token ids of one query and its documents, ready for the forward pass.

    Plain lists of ints, so it pickles cheaply between processes.

    Attributes:
        shared: prefix + instruction + query + ``"<Document>:"``, common to every document.
        documents: per document, ``" {document}"`` (tail-truncated) followed by the suffix; or,
            for a query encoded as windows (:mod:`rerank_core.windows`), one such row per window.
        truncated: per row, whether its document lost tokens (past ``max_length``, or past its
            last window).
    """

    shared: list[int]
    documents: list[list[int]]
    truncated: list[bool]

    def pair_lengths(self) -> list[int]:
        """Length of each full pair sequence (what the official procedure feeds the model)."""
        return [len(self.shared) + len(doc) for doc in self.documents]

    def num_tokens(self) -> int:
        """Tokens of all pairs as the official procedure counts them."""
        return sum(self.pair_lengths())

    def split(self, max_tokens: int, max_pairs: int) -> list[tuple[list[int], EncodedQuery]]:
        """Cut into chunks of documents of similar length under a padded-token budget.

        Returns:
            ``(indices, chunk)`` pairs: ``chunk.documents[j]`` is ``self.documents[indices[j]]``.
            Every document is in exactly one chunk; one longer than ``max_tokens`` is alone.
        """
        lengths = [len(doc) for doc in self.documents]
        return [
            (
                indices,
                EncodedQuery(
                    self.shared, [self.documents[i] for i in indices], [self.truncated[i] for i in indices]
                ),
            )
            for indices in plan_batches(lengths, max_tokens, max_pairs)
        ]


class PromptEncoder:
    """Turns (query, documents, instruction) into :class:`EncodedQuery` ids.

    Args:
        tokenizer: a Qwen3 tokenizer (``transformers`` fast tokenizer; it must add no BOS/EOS).
        max_length: the longest full pair sequence, in tokens (the model card uses 8192).
    """

    def __init__(self, tokenizer, max_length: int = DEFAULT_MAX_LENGTH):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prefix_ids = self._ids(PREFIX)
        self.suffix_ids = self._ids(SUFFIX)
        if max_length <= len(self.prefix_ids) + len(self.suffix_ids):
            raise ValueError(
                f"max_length={max_length} does not fit the prompt template "
                f"({len(self.prefix_ids) + len(self.suffix_ids)} tokens)"
            )

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def encode(
        self,
        query: str,
        documents: Sequence[str],
        instruction: str | None = None,
        max_document_tokens: int | None = None,
    ) -> EncodedQuery:
        """Tokenize one query with its documents exactly as the official procedure does.

        Args:
            query: the query text.
            documents: document texts; an empty string is a valid document.
            instruction: task instruction; ``None`` means :data:`DEFAULT_INSTRUCTION`.
            max_document_tokens: also cut each document part to this many tokens (the part
                counts the space that joins it to the template).

        Returns:
            The shared ids and one id list per document, in input order.

        Raises:
            QueryTooLongError: the query and instruction leave no room for a document token.
        """
        return self.encode_windows(query, documents, instruction, max_document_tokens=max_document_tokens).encoded

    def encode_windows(
        self,
        query: str,
        documents: Sequence[str],
        instruction: str | None = None,
        *,
        max_document_tokens: int | None = None,
        max_windows: int = 1,
        overlap: int = 0,
        truncation_side: str = "right",
        max_pair_tokens: int | None = None,
        spans: bool = False,
    ) -> WindowedQuery:
        """Tokenize one query with its documents cut into windows (see :mod:`rerank_core.windows`).

        With the defaults, one window per document: exactly :meth:`encode`.

        Args:
            query, documents, instruction, max_document_tokens: as for :meth:`encode`.
            max_windows: most windows per document (>= 1).
            overlap: tokens shared by consecutive windows (below the document budget ``W``).
            truncation_side: ``"right"`` cuts a document's end (the model card), ``"left"`` its start.
            max_pair_tokens: also cap each full pair at this many tokens (below ``max_length``).
            spans: also compute each window's character span in its document.

        Raises:
            QueryTooLongError: the query and instruction leave no room for a document token.
            ValueError: ``overlap`` is not below ``W`` while several windows may be taken, or
                another bound is out of range.
        """
        instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
        shared_body = self._ids(_shared_body_text(query, instruction))
        width = self._document_budget(len(shared_body), max_document_tokens, max_pair_tokens)
        # verbose=False: documents longer than the tokenizer's model_max_length are expected here;
        # they are cut below, so its warning would only be noise.
        encoded = self.tokenizer(
            [" " + doc for doc in documents], add_special_tokens=False, verbose=False,
            return_offsets_mapping=spans,
        )
        rows, truncated, document_of, row_spans = [], [], [], []
        for d, ids in enumerate(encoded["input_ids"]):
            bounds = window_bounds(len(ids), width, overlap, max_windows, truncation_side)
            # Consecutive windows touch or overlap, so together they cover one contiguous range.
            dropped = max(end for _, end in bounds) - min(start for start, _ in bounds) < len(ids)
            for start, end in bounds:
                rows.append(ids[start:end] + self.suffix_ids)
                truncated.append(dropped)
                document_of.append(d)
                if spans:
                    row_spans.append(char_span(encoded["offset_mapping"][d], start, end, len(documents[d])))
        return WindowedQuery(
            EncodedQuery(self.prefix_ids + shared_body, rows, truncated),
            document_of,
            row_spans if spans else None,
            len(documents),
        )

    def _document_budget(self, shared_body: int, max_document_tokens: int | None, max_pair_tokens: int | None) -> int:
        """``W``: tokens left for a document part (the official procedure truncates the body)."""
        max_length = self.max_length if max_pair_tokens is None else min(self.max_length, max_pair_tokens)
        budget = max_length - len(self.prefix_ids) - len(self.suffix_ids) - shared_body
        if budget < 1:
            raise QueryTooLongError(
                f"the query and instruction take {shared_body} tokens; with the prompt "
                f"template that leaves no room for a document within max_length={max_length}"
            )
        return budget if max_document_tokens is None else min(budget, max_document_tokens)

