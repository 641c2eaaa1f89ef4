"""``rerank_file``: score a JSONL or Parquet data set on Ray Data and write it back with scores.

    read (JsonlSource / ParquetSource, tasks)
      -> tokenize (map_batches, CPU tasks: check rows, token ids)
      -> score (map_batches, an actor pool of engines: model loaded once per actor)
      -> write (JSONL or Parquet files, tasks)

Order: ``preserve_order`` is on, so output rows come in input order, and output files are named
``part-NNNNNN.<format>`` in that order (``cat OUTPUT/*.jsonl`` reads them back in order).

Re-running: an existing OUTPUT is refused unless ``overwrite=True`` (then replaced). A run that
fails deletes what it wrote, so OUTPUT either holds every row or does not exist.

Faults: a scoring actor that dies (its process, its node) is restarted by Ray (``max_restarts``)
and Ray Data sends its unfinished batches again, up to :data:`MAX_TASK_RETRIES` times each; a
batch that keeps killing actors fails the run instead of looping.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.fs as pafs
import ray
from ray.data import ActorPoolStrategy, DataContext, SaveMode
from ray.data.datasource import FilenameProvider
from ray.util.annotations import RayDeprecationWarning

from .columns import BatchInputError, Columns, Shape
from .options import FORMATS, ModelOptions, Workers
from .sources import JsonlSource, ParquetSource
from .stages import Score, tokenize

SOURCES = {"jsonl": JsonlSource, "parquet": ParquetSource}
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
# Engine token budgets per call to the engine: several forward passes' worth, so that passes
# come out full, while a batch's prefixes (KV caches) are held a few chunks at a time.
CHUNK_PASSES = 4
MAX_RESTARTS = -1  # a dead scoring actor is always replaced (node loss on a cluster)
MAX_TASK_RETRIES = 3  # ... but a batch that kills its actor this many times fails the run
DEFAULT_COLUMNS = Columns()
DEFAULT_WORKERS = Workers()
JSON_DOUBLE_PRECISION = 15  # significant digits of scores in JSONL (pandas' maximum; default 10)


class BatchFailed(RuntimeError):
    """The pipeline failed for a reason other than bad input (model, resources, a worker)."""


@dataclass(frozen=True)
class BatchResult:
    output: str
    output_format: str
    shape: Shape
    files: list[str]


def rerank_file(
    input: str | list[str],
    output: str,
    model: ModelOptions | str,
    *,
    columns: Columns = DEFAULT_COLUMNS,
    top_k: int | None = None,
    input_format: str | None = None,
    output_format: str | None = None,
    overwrite: bool = False,
    workers: Workers = DEFAULT_WORKERS,
    progress: bool = True,
    ray_init: dict | None = None,
) -> BatchResult:
    """Score every (query, document) pair of ``input`` and write ``output`` with the scores.

    Uses the running Ray instance, else calls ``ray.init(**ray_init)`` once the paths are checked
    (default: a local instance; ``{"address": "auto"}`` joins a cluster).

    Args:
        input: a JSONL or Parquet file, a directory of them, or a list; any filesystem Ray Data
            reads (local, ``s3://``, ``gs://``, ...). Query rows or pair rows (see
            :mod:`rerank_batch.columns`); every input column is kept.
        output: a directory to create, holding ``part-NNNNNN.jsonl`` or ``.parquet`` files.
        model: a :class:`ModelOptions`, or just its source (registry name, hub id, directory).
        columns: input column names.
        top_k: keep this many indices in each ``ranking`` (query rows).
        input_format, output_format: ``"jsonl"`` or ``"parquet"``; default: from the input's
            suffix (a local directory: its files'), and for the output its suffix, else the input's.
        overwrite: replace an existing ``output`` instead of refusing it.
        workers: scoring actors and batch sizes.
        progress: show Ray Data's progress bars.
        ray_init: arguments of ``ray.init`` when no Ray instance is running.

    Raises:
        BatchInputError: bad input (a missing column, a malformed row; the message names the
            file and line/row), an unknown format, or an existing output without ``overwrite``.
        ModelSourceError: the model cannot be found.
        BatchFailed: the pipeline failed otherwise.
    """
    from rerank_core.registry import resolve_source

    model = ModelOptions(model) if isinstance(model, str) else model
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    input_format = input_format or _format_of(input)
    output_format = output_format or SUFFIXES.get(Path(output).suffix.lower(), input_format)
    for fmt in (input_format, output_format):
        if fmt not in FORMATS:
            raise BatchInputError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    filesystem, out_path = pafs.FileSystem.from_uri(_uri(output))
    _check_output(filesystem, out_path, output, overwrite)
    if not ray.is_initialized():
        ray.init(**{"log_to_driver": False, **(ray_init or {})})

    source = SOURCES[input_format](input)
    first, first_path = source.first_block()
    shape = columns.shape_of(first.column_names, first_path)
    columns.check_input(first.column_names, shape, first_path)
    # A local directory travels as an absolute path; names and hub ids are resolved by each
    # worker from its own cache. Resolving here first gives a clear error before any work.
    path = resolve_source(model.source, hub=model.hub, cache_dir=model.cache_dir)
    if Path(model.source).expanduser().is_dir():
        model = replace(model, source=str(path.resolve()))

    try:
        with _data_context(progress), _errors_off_console():
            ds = _scored(ray.data.read_datasource(source), source.place, model, columns, shape, top_k, workers)
            _write(ds, output, output_format, overwrite)
    except Exception as e:
        _remove(filesystem, out_path)
        raise _cause(e) from None  # Ray's wrappers add only tracebacks (kept in Ray Data's log file)
    files = sorted(i.path for i in filesystem.get_file_info(pafs.FileSelector(out_path)))
    return BatchResult(output, output_format, shape, files)


def _scored(ds, place: str, model: ModelOptions, columns: Columns, shape: Shape, top_k: int | None,
            workers: Workers):
    """``ds`` (rows read) tokenized and scored: the input's columns plus the output's."""
    num_gpus = workers.num_gpus if workers.num_gpus is not None else _default_gpus(model.device)
    ds = ds.map_batches(
        tokenize, batch_format="pyarrow", batch_size=workers.batch_size, num_cpus=workers.tokenize_cpus,
        fn_kwargs={"model": model, "columns": columns, "shape": shape, "place": place},
    )
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing actor options this way (no named parameter exists yet);
        # without them Ray Data retries a batch whose actor dies without end.
        warnings.simplefilter("ignore", RayDeprecationWarning)
        return ds.map_batches(
            Score, batch_format="pyarrow", batch_size=workers.batch_size,
            compute=ActorPoolStrategy(size=workers.concurrency), num_cpus=workers.num_cpus, num_gpus=num_gpus,
            fn_constructor_kwargs={"model": model, "shape": shape, "top_k": top_k, "chunk_passes": CHUNK_PASSES},
            max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES,
        )


@contextlib.contextmanager
def _data_context(progress: bool):
    """Ray Data settings for one run, restored afterwards (the context is the process's)."""
    context = DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars,
             context.raise_original_map_exception)
    context.execution_options.preserve_order = True
    context.enable_progress_bars = progress
    # A stage's BatchInputError reaches the driver as itself (RayTaskError.cause), not as a
    # UserCodeException that keeps only its traceback text.
    context.raise_original_map_exception = True
    try:
        yield
    finally:
        (context.execution_options.preserve_order, context.enable_progress_bars,
         context.raise_original_map_exception) = saved


@contextlib.contextmanager
def _errors_off_console():
    """Keep Ray Data's error records (a failed task's traceback) off the console during a run.

    The failure reaches the caller as one exception with a clear message; Ray Data's log file
    (under the Ray session's ``logs/ray-data``) still receives the records.
    """
    handlers = [h for h in logging.getLogger("ray.data").handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    for handler in handlers:
        handler.addFilter(_below_error)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(_below_error)


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


class _Parts(FilenameProvider):
    """``part-000000.jsonl``, ``part-000001.jsonl``, ...: write tasks in input order."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:06}.{self.file_format}"


def _write(ds, output: str, output_format: str, overwrite: bool) -> None:
    mode = SaveMode.OVERWRITE if overwrite else SaveMode.CREATE
    names = _Parts(file_format=output_format)
    if output_format == "parquet":
        ds.write_parquet(output, filename_provider=names, mode=mode)
    else:
        ds.write_json(output, filename_provider=names, mode=mode, force_ascii=False,
                      double_precision=JSON_DOUBLE_PRECISION)


def _format_of(input: str | list[str]) -> str:
    first = input[0] if isinstance(input, list) else input
    suffix = SUFFIXES.get("".join(Path(first).suffixes[:1]).lower())
    if suffix:
        return suffix
    local = Path(first).expanduser()
    if local.is_dir():
        found = {SUFFIXES[p.suffix.lower()] for p in local.iterdir() if p.suffix.lower() in SUFFIXES}
        if len(found) == 1:
            return found.pop()
    raise BatchInputError(f"cannot tell the format of {first}: name it .jsonl or .parquet, or give the input format")


def _uri(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _check_output(filesystem, out_path: str, output: str, overwrite: bool) -> None:
    info = filesystem.get_file_info(out_path)
    if info.type == pafs.FileType.File:
        raise BatchInputError(f"output {output} is a file; the output is a directory of part files")
    if info.type == pafs.FileType.Directory and not overwrite:
        raise BatchInputError(f"output {output} already exists; remove it or pass --overwrite to replace it")
    if isinstance(filesystem, pafs.LocalFileSystem) and not Path(out_path).parent.is_dir():
        raise BatchInputError(f"output {output}: directory {Path(out_path).parent} does not exist")


def _remove(filesystem, out_path: str) -> None:
    """Delete a failed run's output (best effort: the error being raised matters more)."""
    try:
        if filesystem.get_file_info(out_path).type == pafs.FileType.Directory:
            filesystem.delete_dir(out_path)
    except OSError:
        pass


def _cause(error: BaseException) -> Exception:
    """The error to report: the :class:`BatchInputError` a stage raised, else a one-line failure.

    Ray wraps a stage's exception (``RayTaskError.cause``, ``UserCodeException`` chained to it),
    and the wrappers' text carries tracebacks, so the chain is searched for the original.
    """
    chain = _chain(error)
    for link in chain:
        if isinstance(link, BatchInputError):
            # Our messages are one line; Ray appends its retry advice to the exception's text.
            return BatchInputError(str(link.args[0]).splitlines()[0])
    root = chain[-1]
    return BatchFailed(f"{type(root).__name__}: {_last_line(root)}")


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and what it wraps (``cause`` attributes, ``__cause__``), outermost first."""
    chain: list[BaseException] = []
    link = error
    while link is not None and link not in chain:
        chain.append(link)
        inner = getattr(link, "cause", None)
        link = inner if isinstance(inner, BaseException) else link.__cause__
    return chain


def _last_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _default_gpus(device: str | None) -> float:
    if device is not None and device != "auto":
        return 1.0 if device.startswith("cuda") else 0.0
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
