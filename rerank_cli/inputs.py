"""Turning the ``-i`` inputs of ``rerank run`` into one query and a list of documents.

Each ``-i`` value is one of:

* ``query: TEXT``: the query (the text after the prefix, stripped). Only the first such input
  is the query; later ones are documents like any other text.
* ``file://PATH``: documents read from a file, by extension:

  - ``.txt``: one document per line; blank lines are skipped.
  - ``.json``: a list of documents, or ``{"query": ..., "documents": [...]}``.
  - ``.jsonl``: one document per line, a JSON string or ``{"text": ...}``; blank lines skipped.

  In JSON files a document is a string or ``{"text": ...}``. A ``.json`` file's query is used
  when no ``-i "query: ..."`` is given (an explicit query takes precedence).
* anything else: one document, verbatim.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

QUERY_PREFIX = "query:"
FILE_PREFIX = "file://"
FILE_TYPES = (".txt", ".json", ".jsonl")


@dataclass(frozen=True)
class Inputs:
    query: str
    documents: list[str]


@dataclass(frozen=True)
class _FileContents:
    documents: list[str]
    query: str | None = None


def parse_inputs(values: Iterable[str]) -> Inputs:
    """The query and documents named by the ``-i`` values, in order.

    Raises:
        UsageError: no query, no documents, or an input file that cannot be read or parsed.
    """
    explicit_query: str | None = None
    file_queries: list[tuple[str, str]] = []  # (query, path)
    documents: list[str] = []
    for value in values:
        if explicit_query is None and value.startswith(QUERY_PREFIX):
            explicit_query = value[len(QUERY_PREFIX):].strip()
            if not explicit_query:
                raise UsageError("the query is empty: give it as -i 'query: TEXT'")
        elif value.startswith(FILE_PREFIX):
            path = value[len(FILE_PREFIX):]
            contents = read_file(path)
            documents.extend(contents.documents)
            if contents.query is not None:
                file_queries.append((contents.query, path))
        else:
            documents.append(value)
    query = explicit_query
    if query is None and file_queries:
        distinct = {q for q, _ in file_queries}
        if len(distinct) > 1:
            paths = ", ".join(p for _, p in file_queries)
            raise UsageError(f"the input files {paths} give different queries; pass -i 'query: TEXT'")
        query = file_queries[0][0]
    if query is None:
        raise UsageError("no query: pass -i 'query: TEXT' (or a .json file with a \"query\")")
    if not documents:
        raise UsageError("no documents: pass them with -i TEXT or -i file://PATH")
    return Inputs(query, documents)


def read_file(path: str) -> _FileContents:
    """Documents (and maybe a query) from a ``.txt``, ``.json`` or ``.jsonl`` file.

    Raises:
        UsageError: unsupported extension, unreadable file, invalid UTF-8, JSON or shape.
    """
    file = Path(path).expanduser()
    suffix = file.suffix.lower()
    if suffix not in FILE_TYPES:
        raise UsageError(
            f"cannot read documents from {path!r}: unsupported file type {suffix or '(none)'!r}; "
            f"use {', '.join(FILE_TYPES)}"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"cannot read {path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e
    if suffix == ".txt":
        return _FileContents([line for line in text.splitlines() if line.strip()])
    if suffix == ".json":
        return _parse_json(text, path)
    return _parse_jsonl(text, path)


def _parse_json(text: str, path: str) -> _FileContents:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from e
    if isinstance(data, list):
        return _FileContents([_document(d, f"{path}: item {i}") for i, d in enumerate(data)])
    if isinstance(data, dict):
        unknown = set(data) - {"query", "documents"}
        if unknown or "documents" not in data:
            raise UsageError(
                f"{path}: expected a list of documents or an object with \"documents\" and an "
                f"optional \"query\", got keys {sorted(data)}"
            )
        query = data.get("query")
        if query is not None and (not isinstance(query, str) or not query.strip()):
            raise UsageError(f"{path}: \"query\" must be a non-empty string")
        docs = data["documents"]
        if not isinstance(docs, list):
            raise UsageError(f"{path}: \"documents\" must be a list, got {type(docs).__name__}")
        return _FileContents(
            [_document(d, f"{path}: documents[{i}]") for i, d in enumerate(docs)],
            None if query is None else query.strip(),
        )
    raise UsageError(f"{path}: expected a list of documents or an object, got {type(data).__name__}")


def _parse_jsonl(text: str, path: str) -> _FileContents:
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{number} is not valid JSON: {e}") from e
        documents.append(_document(item, f"{path}:{number}"))
    return _FileContents(documents)


def _document(item, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and set(item) == {"text"} and isinstance(item["text"], str):
        return item["text"]
    raise UsageError(f"{where}: a document must be a string or {{\"text\": \"...\"}}, got {_describe(item)}")


def _describe(item) -> str:
    text = json.dumps(item, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."
