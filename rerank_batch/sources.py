"""Reading JSONL and Parquet files into Ray Data blocks that remember where each row came from.

Ray Data's own ``read_json`` and ``read_parquet`` lose the line of a row (and ``read_json`` keeps
only the keys of a block's first row when it falls back to Python's parser), so an error could not
name the row at fault. These two datasources are Ray Data's documented extension point
(:class:`~ray.data.datasource.FileBasedDatasource`: Ray lists, splits and retries the files; we
parse one file), and add two columns to every block: the file (:data:`FILE_COLUMN`) and the row's
1-based line (JSONL) or row (Parquet) number (:data:`ROW_COLUMN`).

A JSONL line must be a JSON object; blank lines are skipped (their numbers are still counted).
A key missing from a row is null there. A malformed line raises :class:`BatchInputError` naming
the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from .columns import FILE_COLUMN, ROW_COLUMN, BatchInputError

JSONL_EXTENSIONS = ["jsonl", "json", "jsonl.gz", "json.gz", "jsonl.zst", "json.zst"]
PARQUET_EXTENSIONS = ["parquet"]
# A block is cut once its lines add up to this many bytes (or ROWS_PER_BLOCK rows): small enough
# to keep several in flight per worker, large enough that per-block costs stay negligible.
BLOCK_BYTES = 8 << 20
ROWS_PER_BLOCK = 4096


class JsonlSource(FileBasedDatasource):
    """JSON Lines files, one JSON object per line (``.jsonl``/``.json``, optionally compressed)."""

    place = "line"

    def __init__(self, paths, **kwargs):
        super().__init__(paths, file_extensions=JSONL_EXTENSIONS, **kwargs)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        rows: list[dict] = []
        numbers: list[int] = []
        size = 0
        for number, line in enumerate(_lines(f), start=1):
            if not line.strip():
                continue
            rows.append(_parse_line(line, path, number))
            numbers.append(number)
            size += len(line)
            if size >= BLOCK_BYTES or len(rows) >= ROWS_PER_BLOCK:
                yield _table(rows, numbers, path)
                rows, numbers, size = [], [], 0
        if rows:
            yield _table(rows, numbers, path)

    def first_block(self) -> tuple[pa.Table, str]:
        """The first block of the first file (and that file's path), read here on the driver."""
        return _first_block(self)


class ParquetSource(FileBasedDatasource):
    """Parquet files, read one record batch at a time."""

    place = "row"

    def __init__(self, paths, **kwargs):
        super().__init__(paths, file_extensions=PARQUET_EXTENSIONS, **kwargs)

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        # Parquet keeps its metadata at the end of the file: it needs a seekable file, not the
        # stream the base class opens.
        return filesystem.open_input_file(path)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        try:
            reader = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            raise BatchInputError(f"{path}: not a readable Parquet file ({e})") from e
        start = 1
        for batch in reader.iter_batches(batch_size=ROWS_PER_BLOCK):
            table = pa.Table.from_batches([batch])
            yield _with_place(table, path, list(range(start, start + table.num_rows)))
            start += table.num_rows

    def first_block(self) -> tuple[pa.Table, str]:
        """The first block of the first file (and that file's path), read here on the driver."""
        return _first_block(self)


def _first_block(source: FileBasedDatasource) -> tuple[pa.Table, str]:
    path = source._paths()[0]
    with source._open_input_source(source._filesystem, path) as f:
        for block in source._read_stream(f, path):
            return block, path
    raise BatchInputError(f"{path}: no rows")


def _lines(f: pa.NativeFile, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a stream (without their ends), read in chunks: Arrow streams have no readline."""
    pending = b""
    while True:
        chunk = f.read(chunk_bytes)
        if not chunk:
            break
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        yield from lines
    if pending:
        yield pending


def _parse_line(line: bytes, path: str, number: int) -> dict:
    try:
        row = json.loads(line)
    except UnicodeDecodeError as e:
        raise BatchInputError(f"{path} line {number}: not UTF-8 text ({e.reason})") from e
    except json.JSONDecodeError as e:
        raise BatchInputError(f"{path} line {number}: not valid JSON ({e})") from e
    if not isinstance(row, dict):
        raise BatchInputError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
    return row


def _table(rows: list[dict], numbers: list[int], path: str) -> pa.Table:
    # Every key seen in the block becomes a column, in order of first appearance; a row without
    # it gets null there (pa.Table.from_pylist would keep only the first row's keys).
    names = list(dict.fromkeys(key for row in rows for key in row))
    arrays = {}
    for name in names:
        try:
            arrays[name] = pa.array([row.get(name) for row in rows])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise BatchInputError(_mixed_types(rows, numbers, name, path)) from e
    return _with_place(pa.table(arrays), path, numbers)


def _mixed_types(rows: list[dict], numbers: list[int], name: str, path: str) -> str:
    """Name the first line whose ``name`` value differs in JSON type from the first non-null one."""
    typed = [(n, _json_type(row.get(name))) for n, row in zip(numbers, rows) if row.get(name) is not None]
    first_line, first_type = typed[0]
    line, other = next(((n, t) for n, t in typed if t != first_type), typed[-1])
    return f"{path} line {line}: column {name!r} holds {other}, but line {first_line} holds {first_type}"


def _json_type(value) -> str:
    kinds = ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "a list"), (dict, "an object"))
    return next(kind for types, kind in kinds if isinstance(value, types))


def _with_place(table: pa.Table, path: str, numbers: list[int]) -> pa.Table:
    for name in (FILE_COLUMN, ROW_COLUMN):
        if name in table.column_names:
            raise BatchInputError(f"{path}: the input has a column {name!r}, a name reserved for the pipeline")
    table = table.append_column(FILE_COLUMN, pa.array([path] * table.num_rows, pa.string()))
    return table.append_column(ROW_COLUMN, pa.array(numbers, pa.int64()))
