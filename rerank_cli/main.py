"""``rerank``: rerank documents from the terminal.

Only argparse wiring lives here; each command is in its own module and imports torch (through
``rerank_core``) only when it needs the model, so ``rerank --help`` and ``rerank list`` are fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rerank_core import registry

from .errors import EXIT_RUNTIME, EXIT_USAGE, UsageError, WorkFailed, one_line

# rerank_core.config.DTYPES plus "auto" and the quantized dtypes (QUANTIZED_DTYPES).
DTYPES = ("auto", "float32", "bfloat16", "float16", "int8", "fp8")

EPILOG = """\
exit status: 0 on success, 1 when the work fails (the model cannot be found, downloaded or
loaded; a file cannot be written; a batch fails), 2 for bad options or inputs.
environment: RERANK_HUB (default hub), RERANK_CACHE_DIR (default download cache),
  ONEDNN_MAX_CPU_ISA (e.g. AVX2: choose as a CPU with no more than that ISA; oneDNN runs its
  kernels for it), read by this process and by the Ray cluster it starts.

defaults by device (--dtype auto; the same for serve and batch, whose layers are compiled
where this says so; run compiles only with --compile):
  x86 CPU with AMX or AVX512-BF16 (Xeon 4th gen and later, Cooper Lake, AMD Zen 4 and later):
      bfloat16, packed passes, compiled layers; bf16 keys padded to AMX tiles where there is AMX
  other x86 CPUs (AVX2, or AVX-512 without bf16: AMD EPYC Rome/Milan, older Xeons):
      float32 (bf16 is emulated there, about 4x slower), packed passes, eager layers
  CUDA GPU: bfloat16, packed varlen passes, eager layers
  batch invariance is off everywhere (an option); every dtype runs on every CPU kind."""

RUN_EPILOG = """\
inputs (-i, repeatable, in order):
  'query: TEXT'    the query (the first input with this prefix; later ones are documents)
  file://PATH      documents from a file:
                     .txt    one per line, blank lines skipped
                     .json   a list of strings, or {"query": ..., "documents": [...]}
                     .jsonl  one JSON string or {"text": ...} per line
                   a .json file's query is used when no 'query: ...' input is given
  TEXT             one document

examples:
  rerank run -i "query: What is ML?" -i "Machine learning is..." -i "The weather..."
  rerank run -m /path/to/checkpoint -i "query: rivers" -i file://docs.txt --top-k 5 --json
"""


BATCH_EPILOG = """\
input (JSONL or Parquet; a file, a directory of files, or several; any filesystem Ray Data reads):
  one row per query   {"query": ..., "documents": [...], "instruction": ...?}
                      -> adds "scores" (one per document, in order) and "ranking" (indices, best first)
  one row per pair    {"query": ..., "document": ..., "instruction": ...?}   -> adds "scores" (a number)
  Every input column is kept, rows stay in input order. A missing or null instruction means the
  model card's default.
output: a new directory of part-000000.jsonl, part-000001.jsonl, ... (or .parquet) files in input
  order; an existing OUTPUT is refused unless --overwrite. A failed run deletes what it wrote.

examples:
  rerank batch candidates.jsonl -o scored/ --top-k 10
  rerank batch pairs.parquet -o scored.parquet -m /models/Qwen3-Reranker-4B --concurrency 4 --num-gpus 1
  ray job submit --working-dir . -- rerank batch s3://bucket/run.parquet -o s3://bucket/scored/
"""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``rerank: error: ...`` and exit code 2, no usage dump."""

    def error(self, message: str):
        command = self.prog.split(" ", 1)[1] if " " in self.prog else None
        hint = f"rerank {command} --help" if command else "rerank --help"
        self.exit(EXIT_USAGE, f"rerank: error: {one_line(message)} (see '{hint}')\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def port_number(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number (1-65535), got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def non_blank(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def build_parser() -> argparse.ArgumentParser:
    known = ", ".join(registry.REGISTRY)
    parser = Parser(
        prog="rerank",
        description="Rerank documents by relevance to a query with Qwen3-Reranker models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add_model_source_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--hub", choices=registry.HUBS, default=None,
                       help=f"hub to download hub ids from (default: $RERANK_HUB or {registry.DEFAULT_HUB})")
        p.add_argument("--cache-dir", metavar="DIR", default=None,
                       help="download cache (default: $RERANK_CACHE_DIR, else the hub library's own cache)")

    def add_model_options(p: argparse.ArgumentParser) -> None:
        """The model and how the engine runs it: shared by ``run`` and ``batch``."""
        p.add_argument("-m", "--model", default=registry.DEFAULT_MODEL, metavar="MODEL",
                       help=f"registry name ({known}), hub id or local checkpoint directory "
                            f"(default: {registry.DEFAULT_MODEL})")
        p.add_argument("--max-length", type=positive_int, metavar="TOKENS",
                       help="longest query+document prompt in tokens; longer documents are cut (default: 8192)")
        p.add_argument("--device", metavar="DEVICE", help="torch device, e.g. cpu, cuda, cuda:1 (default: auto)")
        p.add_argument("--dtype", choices=DTYPES, help="weights' dtype (default: auto: bfloat16 on CUDA and on CPUs "
                       "with native bf16, else float32; float32 is the exact mode; int8 (CPU) and fp8 "
                       "(CUDA, compute capability 8.9+) quantize the decoder's linear layers)")
        add_model_source_options(p)

    run = commands.add_parser(
        "run", help="rank documents against a query on this machine",
        description="Score documents against a query with a Qwen3-Reranker model on this machine\n"
                    "and print them best first.",
        epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("-i", "--input", dest="inputs", action="append", metavar="INPUT",
                     help="the query ('query: TEXT'), a document, or file://PATH of documents; repeatable")
    run.add_argument("--top-k", type=positive_int, metavar="K", help="print only the K best documents")
    run.add_argument("--instruction", type=non_blank, metavar="TEXT",
                     help="task instruction of the prompt (default: the model card's web search instruction)")
    add_model_options(run)
    run.add_argument("--max-chunks", type=positive_int, metavar="N",
                     help="score a long document as up to N windows of the token budget and keep the best "
                          "(default: 1, the document's start as the model card truncates)")
    run.add_argument("--json", action="store_true",
                     help="print the POST /rerank response body (with documents) instead of a table; "
                          "with -o, write it to FILE only")
    run.add_argument("-o", "--output", metavar="FILE",
                     help="write the JSON response body to FILE instead of printing it (the table is still "
                          "printed without --json)")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bar on stderr (shown above 64 documents when stderr is a terminal)")
    run.add_argument("--compile", action="store_true",
                     help="compile the decoder layers with torch.compile (float dtypes; packed passes only): in bf16 on a CPU with "
                          "AMX about 1.27x faster scoring for 10-30 s more start-up, so worth it above a few "
                          "hundred documents (default: off for run; serve and batch compile where bf16 is native)")
    run.set_defaults(handler="rerank_cli.run_cmd:run")

    ls = commands.add_parser(
        "list", help="list the known models and whether they are cached",
        description="List the registry's models: name, hub id, size, the default (*), and whether "
                    "the weights are in the local ModelScope or Hugging Face cache (no network).",
    )
    ls.add_argument("--cache-dir", metavar="DIR", default=None,
                    help="look in this download cache (default: $RERANK_CACHE_DIR, else the hubs' default caches)")
    ls.add_argument("--json", action="store_true", help="print a JSON list (with the cached directories)")
    ls.set_defaults(handler="rerank_cli.models_cmd:list_models")

    dl = commands.add_parser(
        "download", help="download a model's weights into the cache",
        description="Download a model into the cache (or find it there) and print its local directory.",
    )
    dl.add_argument("model", metavar="MODEL", help=f"registry name ({known}) or hub id")
    add_model_source_options(dl)
    dl.set_defaults(handler="rerank_cli.models_cmd:download")

    add_batch_parser(commands, add_model_options)

    sv = commands.add_parser(
        "serve", help="run the HTTP service locally (Ray Serve)",
        description="Start the Ray Serve application locally with `serve run` until Ctrl-C. CONFIG is "
                    "not modified: --model/--hub/--cache-dir/--port/--host are applied to a temporary "
                    "copy. Model sources are resolved (downloaded if needed) before Ray starts; the "
                    "command exits with status 1 and one line if that fails or an application fails "
                    "to deploy.",
    )
    sv.add_argument("config", nargs="?", metavar="CONFIG",
                    help="Serve config YAML (default: the repository's configs/serve-cpu.yaml)")
    sv.add_argument("--model", metavar="SOURCE",
                    help="model source (name, hub id or directory) for the first model of the first application")
    sv.add_argument("--hub", choices=registry.HUBS, default=None,
                    help="hub the first model downloads from (default: its `hub` in CONFIG, else $RERANK_HUB "
                         f"or {registry.DEFAULT_HUB})")
    sv.add_argument("--cache-dir", metavar="DIR", default=None,
                    help="download cache of the first model (default: its `cache_dir` in CONFIG, else "
                         "$RERANK_CACHE_DIR, else the hub library's own cache)")
    sv.add_argument("--port", type=port_number, help="HTTP port (default: the config's http_options.port)")
    sv.add_argument("--host", help="HTTP host (default: the config's http_options.host)")
    sv.add_argument("--address", metavar="ADDRESS",
                    help="Ray cluster to deploy to, e.g. 'auto' for the one `ray start` launched "
                         "(default: $RAY_ADDRESS, else 'local': a new local cluster, stopped with the app)")
    sv.set_defaults(handler="rerank_cli.serve_cmd:serve")
    return parser


def add_batch_parser(commands, add_model_options) -> None:
    from rerank_batch.options import DEFAULT_BATCH_SIZE, FORMATS  # no Ray, no torch: --help stays fast

    bt = commands.add_parser(
        "batch", help="score a JSONL or Parquet data set on Ray Data (local or a cluster)",
        description="Score every (query, document) pair of INPUT with a Qwen3-Reranker model on Ray Data\n"
                    "and write the rows with their scores to the directory OUTPUT.",
        epilog=BATCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bt.add_argument("input", nargs="+", metavar="INPUT", help="JSONL or Parquet file(s) or directories")
    bt.add_argument("-o", "--output", required=True, metavar="OUTPUT", help="output directory to create")
    bt.add_argument("--top-k", type=positive_int, metavar="K", help="keep K indices in each ranking (query rows)")
    bt.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (default: refuse)")
    bt.add_argument("--input-format", choices=FORMATS, help="default: from INPUT's suffix")
    bt.add_argument("--output-format", choices=FORMATS, help="default: from OUTPUT's suffix, else the input's")
    for name, default in (("query", "query"), ("documents", "documents"), ("document", "document"),
                          ("instruction", "instruction")):
        bt.add_argument(f"--{name}-column", type=non_blank, default=default, metavar="NAME",
                        help=f"input column of the {name} (default: {default})")
    bt.add_argument("--concurrency", type=positive_int, default=1, metavar="N",
                    help="scoring actors, each with its own copy of the model (default: 1)")
    bt.add_argument("--num-cpus", type=non_negative_float, default=1.0, metavar="C",
                    help="CPUs per scoring actor; a CPU engine runs that many threads (default: 1)")
    bt.add_argument("--num-gpus", type=non_negative_float, metavar="G",
                    help="GPUs per scoring actor (default: 1 if the model runs on CUDA, else 0)")
    bt.add_argument("--tokenize-cpus", type=non_negative_float, default=1.0, metavar="C",
                    help="CPUs per tokenize task (default: 1)")
    bt.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, metavar="ROWS",
                    help=f"input rows per tokenize and score call (default: {DEFAULT_BATCH_SIZE})")
    bt.add_argument("--max-batch-tokens", type=positive_int, metavar="TOKENS",
                    help="tokens per forward pass (default: 8192)")
    bt.add_argument("--max-batch-pairs", type=positive_int, metavar="PAIRS",
                    help="pairs per forward pass (default: 64)")
    add_model_options(bt)
    bt.add_argument("--address", metavar="ADDRESS",
                    help="Ray cluster to run on (default: $RAY_ADDRESS, set by `ray job submit`; "
                         "else a local Ray instance for this run)")
    bt.add_argument("--no-progress", action="store_true", help="no Ray Data progress bars")
    bt.set_defaults(handler="rerank_cli.batch_cmd:batch")


def _handler(spec: str):
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


# ModelScope retries an unreachable hub for about 25 s by default. At a terminal (and in the
# service `rerank serve` starts, which inherits the environment) a missing network should fail
# within seconds: fewer retries, unless these variables (ModelScope's own) are set already.
HUB_RETRY_DEFAULTS = {"MODELSCOPE_API_MAX_RETRIES": "1", "MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS": "1"}


def main(argv: list[str] | None = None) -> int:
    for name, value in HUB_RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return _handler(args.handler)(args)
    except UsageError as e:
        return _fail(e, EXIT_USAGE)
    # The except clause's tuple is evaluated only when an exception gets here, so it can name the
    # ModelSourceError classes loaded by then (rerank_core's, and/or the torch-free copy's).
    except (ValueError, OSError, json.JSONDecodeError, registry.ModelSourceError, WorkFailed) as e:
        return _fail(e, EXIT_RUNTIME)
    except KeyboardInterrupt:
        print("rerank: interrupted", file=sys.stderr)
        return 130


def _fail(error: BaseException, code: int) -> int:
    sys.stdout.flush()
    print(f"rerank: error: {one_line(error) or type(error).__name__}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
