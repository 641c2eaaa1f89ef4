"""rerank_batch: offline reranking of whole data sets on Ray Data (``rerank batch``).

    from rerank_batch import rerank_file
    rerank_file("candidates.jsonl", "scored/", "qwen3-reranker-0.6b", top_k=10)

Its own package, beside the engine and the service: ``rerank_core`` must not import Ray, and
``deployments`` is the Serve application (HTTP, replicas), which a batch job neither starts nor
needs. This package depends on ``rerank_core`` only (and on Ray Data); the ``rerank batch``
command (``rerank_cli.batch_cmd``) and a ``ray job submit`` entrypoint both call
:func:`rerank_file`.

Modules: ``options`` (model and worker settings) and ``columns`` (input shapes, column names,
row checks), both free of Ray; ``sources`` (JSONL and Parquet readers that remember each row's
file and line), ``stages`` (tokenize and score), ``pipeline`` (:func:`rerank_file`: the Ray Data
pipeline, output and failure handling). Names are imported on first use (PEP 562), so that the
CLI's ``--help`` does not import Ray.
"""

from importlib import import_module

_EXPORTS = {
    "BatchInputError": "columns",
    "Columns": "columns",
    "Shape": "columns",
    "ModelOptions": "options",
    "Workers": "options",
    "BatchFailed": "pipeline",
    "BatchResult": "pipeline",
    "rerank_file": "pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rerank_batch' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
