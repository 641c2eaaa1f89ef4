"""``rerank run``: score documents against a query on this machine and print the ranking."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rerank_core import registry

from .errors import UsageError
from .inputs import parse_inputs
from .output import Progress, response_body, table, to_json

SLICE = 64  # documents per call to the engine; the progress bar moves once per slice
PROGRESS_ABOVE = 64  # show a progress bar when there are more documents than this


def run(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is checked before loading it.
    inputs = parse_inputs(args.inputs or [])
    output = Path(args.output).expanduser() if args.output else None
    if output is not None and not output.parent.is_dir():
        raise UsageError(f"argument -o/--output: directory {output.parent} does not exist")
    path = registry.resolve_source(args.model, hub=args.hub, cache_dir=args.cache_dir)

    from transformers.utils import logging as transformers_logging

    from rerank_core import EngineConfig, Reranker, rank  # torch and transformers: seconds

    transformers_logging.disable_progress_bar()  # stderr is for errors and our own progress bar
    _check_device(args.device)
    # One-off runs are mostly start-up: compiling the layers (rerank_core.compiled) would add more
    # seconds than it saves on a few documents, so it is opt-in here, on any CPU kind and dtype.
    config = EngineConfig(compile_layers=bool(args.compile))
    reranker = Reranker.load(path, device=args.device, dtype=args.dtype, max_length=args.max_length, config=config)
    # A bar redraws itself with `\r`: on a terminal only, never into a log file or a pipe.
    show_progress = len(inputs.documents) > PROGRESS_ABOVE and not args.no_progress and sys.stderr.isatty()
    scores, num_tokens = score_in_slices(
        reranker, inputs.query, inputs.documents, args.instruction, show_progress, args.max_chunks
    )
    results = rank(scores, inputs.documents, args.top_k)
    body = response_body(args.model, results, num_tokens)
    # The JSON body goes to one place: FILE when -o names one, else stdout with --json. The table
    # is for people and is printed unless --json asked for JSON.
    if not args.json:
        print(table(body), flush=True)
    elif output is None:
        print(to_json(body), flush=True)
    if output is not None:
        try:
            output.write_text(to_json(body) + "\n", encoding="utf-8")
        except OSError as e:
            raise OSError(f"cannot write {output}: {e.strerror or e}") from e
    return 0


def score_in_slices(reranker, query: str, documents: list[str], instruction: str | None,
                    show_progress: bool = False, max_chunks: int | None = None) -> tuple[list[float], int]:
    """Scores of ``documents`` in input order and the tokens scored, ``SLICE`` documents at a time.

    ``max_chunks``: windows per long document (``None``: one, the model card's truncation).
    """
    scores: list[float] = []
    num_tokens = 0
    progress = Progress(len(documents)) if show_progress else None
    try:
        for start in range(0, len(documents), SLICE):
            chunk = documents[start:start + SLICE]
            result = reranker.score_windowed(
                reranker.encode_windows(query, chunk, instruction, max_chunks_per_doc=max_chunks)
            )
            scores.extend(result.scores())
            num_tokens += result.tokens
            if progress is not None:
                progress.update(len(chunk))
    finally:
        if progress is not None:
            progress.close()
    return scores, num_tokens


def _check_device(device: str | None) -> None:
    if device is None or device == "auto":
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"argument --device: invalid device {device!r} ({e})") from e
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
