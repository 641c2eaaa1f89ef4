"""The two Ray Data stages between reading and writing: tokenize (CPU tasks) and score (actors).

Only token ids cross from one to the other (two list columns), as between the service's ingress
and its replicas. Both stages take and return ``pyarrow.Table`` batches and keep every input column and
the row order; the pipeline hands them to ``map_batches``.
"""

from __future__ import annotations

import functools
from dataclasses import fields

import pyarrow as pa

from rerank_core.prompt import DEFAULT_MAX_LENGTH

from .columns import (
    DOCS_COLUMN,
    FILE_COLUMN,
    RANKING,
    ROW_COLUMN,
    SCORES,
    SHARED_COLUMN,
    BatchInputError,
    Columns,
    Shape,
    row_values,
)
from .options import ModelOptions

_IDS = pa.list_(pa.int32())


def tokenize(batch: pa.Table, model: ModelOptions, columns: Columns, shape: Shape, place: str) -> pa.Table:
    """Check each row and turn it into token ids (``SHARED_COLUMN``, ``DOCS_COLUMN``).

    Rows of the same query and instruction within a batch (pair rows, typically) are tokenized
    together: their shared ids are computed once and are equal, which is how :class:`Score`
    recognizes them. ``place`` names a row's position in its file (``"line"`` or ``"row"``).

    Raises:
        BatchInputError: a row fails :func:`~rerank_batch.columns.row_values`, or its query is too
            long to leave room for a document; the message names the file and line/row.
    """
    encoder = _encoder(model)
    rows = batch.select([FILE_COLUMN, ROW_COLUMN, *_read_columns(batch, columns)]).to_pylist()

    def where(row: dict) -> str:
        return f"{row[FILE_COLUMN]} {place} {row[ROW_COLUMN]}"

    values = [row_values(row, columns, shape, where(row)) for row in rows]
    groups: dict[tuple[str, str | None], list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault((v.query, v.instruction), []).append(i)
    shared: list = [None] * len(rows)
    docs: list = [None] * len(rows)
    for (query, instruction), members in groups.items():
        texts = [doc for i in members for doc in values[i].documents]
        try:
            encoded = encoder.encode(query, texts, instruction)
        except ValueError as e:  # QueryTooLongError: the same for every member
            raise BatchInputError(f"{where(rows[members[0]])}: {e}") from e
        start = 0
        for i in members:
            count = len(values[i].documents)
            shared[i] = encoded.shared
            docs[i] = encoded.documents[start:start + count]
            start += count
    batch = batch.drop_columns([FILE_COLUMN, ROW_COLUMN])
    batch = batch.append_column(SHARED_COLUMN, pa.array(shared, _IDS))
    return batch.append_column(DOCS_COLUMN, pa.array(docs, pa.list_(_IDS)))


@functools.lru_cache(maxsize=4)
def _encoder(model: ModelOptions):
    """The tokenizer, loaded once per worker process (Ray reuses them across tasks)."""
    from rerank_core import load_encoder

    return load_encoder(model.source, model.max_length or DEFAULT_MAX_LENGTH, hub=model.hub, cache_dir=model.cache_dir)


def _read_columns(batch: pa.Table, columns: Columns) -> list[str]:
    wanted = (columns.query, columns.documents, columns.document, columns.instruction)
    return [name for name in dict.fromkeys(wanted) if name in batch.column_names]


class Score:
    """An engine on one worker (GPU or CPU cores): scores token ids and adds the output columns.

    The model is loaded once, when Ray Data starts the actor, on the actor's compute thread, where
    every forward pass runs too: Ray Data calls ``__call__`` from a thread of its own, and a second
    thread running torch work makes every small CPU op slower (:mod:`rerank_core.compute_thread`).
    Rows with equal shared ids (the same query and instruction) are scored as one query, so their
    shared prefix runs once; the rows of a batch go to the engine in chunks of about
    ``chunk_tokens`` tokens, and the engine cuts each chunk into forward passes under its budget.

    Adds ``scores`` (query rows: one per document, in document order; pair rows: a number) and,
    for query rows, ``ranking`` (document indices, best first, ties by lower index, cut to
    ``top_k``).
    """

    def __init__(self, model: ModelOptions, shape: Shape, top_k: int | None, chunk_passes: int):
        from rerank_core import EngineConfig, Reranker
        from rerank_core.compute_thread import ComputeThread

        engine_fields = {f.name for f in fields(EngineConfig)}
        settings = {k: v for k, v in vars(model).items() if k in engine_fields and v is not None}
        self.compute = ComputeThread()
        self.reranker = self.compute.call(Reranker.load, model.source, hub=model.hub, cache_dir=model.cache_dir,
                                          config=EngineConfig(**settings))
        self.shape = shape
        self.top_k = top_k
        self.chunk_tokens = chunk_passes * self.reranker.config.max_batch_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        from rerank_core import rank_indices

        shared = batch.column(SHARED_COLUMN).to_pylist()
        docs = batch.column(DOCS_COLUMN).to_pylist()
        scores = self.compute.call(self._score, shared, docs)
        batch = batch.drop_columns([SHARED_COLUMN, DOCS_COLUMN])
        if self.shape is Shape.PAIRS:
            return batch.append_column(SCORES, pa.array([s[0] for s in scores], pa.float64()))
        batch = batch.append_column(SCORES, pa.array(scores, pa.list_(pa.float64())))
        ranking = [rank_indices(s, self.top_k) for s in scores]
        return batch.append_column(RANKING, pa.array(ranking, pa.list_(pa.int32())))

    def _score(self, shared: list[list[int]], docs: list[list[list[int]]]) -> list[list[float]]:
        """Per row, the score of each of its documents (run on the compute thread)."""
        from rerank_core import EncodedQuery

        groups: dict[tuple[int, ...], list[int]] = {}
        for row, ids in enumerate(shared):
            groups.setdefault(tuple(ids), []).append(row)
        scores: list[list[float]] = [[] for _ in shared]
        for chunk in self._chunks(groups, docs):
            queries = [
                EncodedQuery(list(key), [d for row in rows for d in docs[row]], [False] * sum(len(docs[r]) for r in rows))
                for key, rows in chunk
            ]
            for (_, rows), query_scores in zip(chunk, self.reranker.score_encoded(queries)):
                start = 0
                for row in rows:
                    scores[row] = query_scores[start:start + len(docs[row])]
                    start += len(docs[row])
        return scores

    def _chunks(self, groups: dict, docs: list) -> list[list[tuple]]:
        """Groups in consecutive chunks of about ``chunk_tokens`` tokens (a larger group alone):
        enough for full forward passes, few enough prefixes held at once."""
        chunks: list[list[tuple]] = [[]]
        tokens = 0
        for key, rows in groups.items():
            size = len(key) + sum(len(d) for row in rows for d in docs[row])
            if chunks[-1] and tokens + size > self.chunk_tokens:
                chunks.append([])
                tokens = 0
            chunks[-1].append((key, rows))
            tokens += size
        return [c for c in chunks if c]


