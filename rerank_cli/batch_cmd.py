"""``rerank batch``: score a JSONL or Parquet data set on Ray Data (:mod:`rerank_batch`).

Ray: ``--address`` or ``$RAY_ADDRESS`` (set by ``ray job submit``) names a cluster to join;
otherwise a local Ray instance is started for the run. It declares at least as many logical CPUs
as the scoring actors and one tokenize task reserve, even on a machine with fewer cores, so that a
single actor given every core (``--num-cpus``) leaves a slot for the light read, tokenize and
write tasks instead of stalling the pipeline.
"""

from __future__ import annotations

import argparse
import math
import os

from .errors import UsageError, WorkFailed


def batch(args: argparse.Namespace) -> int:
    from rerank_batch import BatchFailed, BatchInputError, Columns, ModelOptions, Workers, rerank_file

    try:
        workers = Workers(concurrency=args.concurrency, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                          tokenize_cpus=args.tokenize_cpus, batch_size=args.batch_size)
    except ValueError as e:
        raise UsageError(str(e)) from e
    columns = Columns(query=args.query_column, documents=args.documents_column,
                      document=args.document_column, instruction=args.instruction_column)
    model = ModelOptions(args.model, hub=args.hub, cache_dir=args.cache_dir, device=args.device, dtype=args.dtype,
                         max_length=args.max_length, max_batch_tokens=args.max_batch_tokens,
                         max_batch_pairs=args.max_batch_pairs)
    inputs = args.input if len(args.input) > 1 else args.input[0]
    try:
        result = rerank_file(inputs, args.output, model, columns=columns, top_k=args.top_k,
                             input_format=args.input_format, output_format=args.output_format,
                             overwrite=args.overwrite, workers=workers, progress=not args.no_progress,
                             ray_init=ray_init_args(args.address or os.environ.get("RAY_ADDRESS"), workers))
    except BatchInputError as e:
        raise UsageError(str(e)) from e
    except BatchFailed as e:
        raise WorkFailed(f"the batch failed: {e}") from e
    shape = "query rows" if result.shape.value == "queries" else "pair rows"
    print(f"rerank: wrote {args.output} ({len(result.files)} {result.output_format} files, {shape})", flush=True)
    return 0


def ray_init_args(address: str | None, workers) -> dict:
    """``ray.init`` arguments: join ``address``, else a local instance with enough logical CPUs."""
    if address:
        return {"address": address}
    needed = workers.concurrency * workers.num_cpus + workers.tokenize_cpus
    return {"num_cpus": max(os.cpu_count() or 1, math.ceil(needed)), "include_dashboard": False}
