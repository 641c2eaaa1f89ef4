"""rerank_core: the Qwen3-Reranker scoring engine (no Ray, no HTTP).

    from rerank_core import Reranker
    reranker = Reranker.load("qwen3-reranker-0.6b")
    reranker.rank("What is ML?", ["Machine learning is ...", "The weather ..."], top_k=1)
"""

from .config import EngineConfig
from .prompt import DEFAULT_INSTRUCTION, EncodedQuery, PromptEncoder, QueryTooLongError
from .ranking import RankResult, rank, rank_indices
from .registry import REGISTRY, ModelSourceError, ModelSpec, resolve_source
from .reranker import Reranker, load_encoder, validate_request

__all__ = [
    "DEFAULT_INSTRUCTION",
    "REGISTRY",
    "EncodedQuery",
    "EngineConfig",
    "ModelSourceError",
    "ModelSpec",
    "PromptEncoder",
    "QueryTooLongError",
    "RankResult",
    "Reranker",
    "load_encoder",
    "rank",
    "rank_indices",
    "resolve_source",
    "validate_request",
]
