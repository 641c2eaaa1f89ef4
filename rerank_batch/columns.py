"""Which input columns hold what, the two row shapes, and checking one row's values.

Plain Python (no Ray, no torch): the read and tokenize stages call it on every row, and the
driver calls it on the first block to tell the shape.

Input rows come in one of two shapes:

* **query rows**: a query, its list of documents and an optional instruction; each gets a list
  of scores (document order) and a ranking.
* **pair rows**: a query, one document and an optional instruction; each gets one score.

The shape is the input's, decided by its first block: a ``documents`` column makes query rows,
else a ``document`` column makes pair rows. Column names are the caller's (:class:`Columns`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum

# Columns the pipeline adds while it runs, never written out. The prefix keeps them apart from
# the caller's columns; an input column with this prefix is refused (Columns.check_input).
INTERNAL_PREFIX = "_rerank_"
FILE_COLUMN = INTERNAL_PREFIX + "file"  # where a row came from, for error messages
ROW_COLUMN = INTERNAL_PREFIX + "row"  # its line (JSONL) or row (Parquet) number, 1-based
SHARED_COLUMN = INTERNAL_PREFIX + "shared"  # token ids common to the row's pairs
DOCS_COLUMN = INTERNAL_PREFIX + "docs"  # token ids of each document part

SCORES = "scores"
RANKING = "ranking"


class BatchInputError(ValueError):
    """The input cannot be scored as given: a missing column, a malformed row or file.

    The message names the file and the line (JSONL) or row (Parquet).
    """


class Shape(str, Enum):
    QUERIES = "queries"  # one row per query, with its documents
    PAIRS = "pairs"  # one row per (query, document) pair


@dataclass(frozen=True)
class Columns:
    """Names of the input columns read by the pipeline (every other column is passed through).

    Attributes:
        query: the query text.
        documents: a list of document texts (query rows).
        document: one document text (pair rows).
        instruction: the task instruction; a missing column or a null value means the default.
    """

    query: str = "query"
    documents: str = "documents"
    document: str = "document"
    instruction: str = "instruction"

    def shape_of(self, names: list[str], where: str) -> Shape:
        """The row shape of an input whose columns are ``names``.

        Raises:
            BatchInputError: neither a documents nor a document column, or no query column.
        """
        if self.query not in names:
            raise BatchInputError(f"{where}: no column {self.query!r} (the query); columns are {_listed(names)}")
        if self.documents in names:
            return Shape.QUERIES
        if self.document in names:
            return Shape.PAIRS
        raise BatchInputError(
            f"{where}: no column {self.documents!r} (one row per query with its documents) or "
            f"{self.document!r} (one row per pair); columns are {_listed(names)}"
        )

    def check_input(self, names: list[str], shape: Shape, where: str) -> None:
        """Refuse an input whose columns would clash with the output's.

        Raises:
            BatchInputError: a column named like an output or internal column.
        """
        taken = [SCORES, RANKING] if shape is Shape.QUERIES else [SCORES]
        for name in names:
            if name in (FILE_COLUMN, ROW_COLUMN):
                continue  # added by the readers, which refuse these names in the input
            if name in taken or name.startswith(INTERNAL_PREFIX):
                raise BatchInputError(
                    f"{where}: the input has a column {name!r}, which the output adds; rename or drop it"
                )


@dataclass(frozen=True)
class RowValues:
    """The values of one row that the model reads."""

    query: str
    documents: list[str]  # one element for a pair row
    instruction: str | None


def row_values(row: dict, columns: Columns, shape: Shape, where: str) -> RowValues:
    """Check one row and return its query, documents and instruction.

    Args:
        row: the row's values by column name (a column absent from the row is ``None``).
        where: the row's place, e.g. ``"data.jsonl line 3"``, for error messages.

    Raises:
        BatchInputError: a missing or blank query, documents that are not a non-empty list of
            strings, a document that is not a string, or an instruction that is neither null
            nor a non-empty string.
    """
    query = row.get(columns.query)
    if not isinstance(query, str) or not query.strip():
        raise BatchInputError(f"{where}: {columns.query!r} must be a non-empty string, got {_describe(query)}")
    if shape is Shape.QUERIES:
        documents = row.get(columns.documents)
        if not isinstance(documents, list) or not documents:
            raise BatchInputError(
                f"{where}: {columns.documents!r} must be a non-empty list of strings, got {_describe(documents)}"
            )
        for i, doc in enumerate(documents):
            if not isinstance(doc, str):
                raise BatchInputError(f"{where}: {columns.documents}[{i}] must be a string, got {_describe(doc)}")
    else:
        document = row.get(columns.document)
        if not isinstance(document, str):
            raise BatchInputError(f"{where}: {columns.document!r} must be a string, got {_describe(document)}")
        documents = [document]
    instruction = row.get(columns.instruction)
    if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
        raise BatchInputError(
            f"{where}: {columns.instruction!r} must be null or a non-empty string, got {_describe(instruction)}"
        )
    return RowValues(query, documents, instruction)


def _describe(value) -> str:
    if value is None:
        return "null (or missing)"
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _listed(names: list[str]) -> str:
    shown = [n for n in names if not n.startswith(INTERNAL_PREFIX)]
    return ", ".join(repr(n) for n in shown) or "(none)"
