"""Turning scores into a ranking: one rule shared by the engine, the service and the CLI."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RankResult:
    """One ranked document.

    Attributes:
        index: position of the document in the caller's list.
        relevance_score: probability of "yes", in [0, 1].
        document: the document text when asked for, else ``None``.
        span: character ``(start, end)`` of the document's best window, when asked for.
    """

    index: int
    relevance_score: float
    document: str | None = None
    span: tuple[int, int] | None = None


def rank_indices(scores: Sequence[float], top_k: int | None = None) -> list[int]:
    """Indices of ``scores``, highest score first, ties by lower index, cut to ``top_k``.

    Raises:
        ValueError: ``top_k`` is given and below 1.
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order if top_k is None else order[:top_k]


def rank(
    scores: Sequence[float],
    documents: Sequence[str] | None = None,
    top_k: int | None = None,
    spans: Sequence[tuple[int, int]] | None = None,
) -> list[RankResult]:
    """Ranked results for ``scores``; attaches ``documents[i]`` / ``spans[i]`` when given."""
    return [
        RankResult(i, scores[i], None if documents is None else documents[i], None if spans is None else spans[i])
        for i in rank_indices(scores, top_k)
    ]
