"""rerank_core: the Qwen3-Reranker scoring engine (no Ray, no HTTP).

    from rerank_core import Reranker
    reranker = Reranker.load("qwen3-reranker-0.6b")
    reranker.rank("What is ML?", ["Machine learning is ...", "The weather ..."], top_k=1)

Names are imported on first use (PEP 562), so that ``rerank_core.registry`` and
``rerank_core.prompt`` load without torch: the CLI's ``--help`` and ``list`` stay instant.
"""

from importlib import import_module

_EXPORTS = {
    "DEFAULT_INSTRUCTION": "prompt",
    "EncodedQuery": "prompt",
    "PromptEncoder": "prompt",
    "QueryTooLongError": "prompt",
    "EngineConfig": "config",
    "RankResult": "ranking",
    "rank": "ranking",
    "rank_indices": "ranking",
    "REGISTRY": "registry",
    "ModelSourceError": "registry",
    "ModelSpec": "registry",
    "resolve_source": "registry",
    "Reranker": "reranker",
    "load_encoder": "reranker",
    "validate_request": "reranker",
    "DocumentScores": "windows",
    "WindowedQuery": "windows",
    "window_bounds": "windows",
    "group_by_query": "pairs",
    "probabilities": "head",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rerank_core' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
