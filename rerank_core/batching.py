"""Packing sequences of unequal length into forward passes.

One pure function, kept apart from the model so that it can be tested alone: sort by length so
that rows of similar length share a batch (little padding), cut the sorted run into batches under
a padded-token budget and a row cap, and let the caller restore the input order by index.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Group row indices into batches whose padded size fits a budget.

    A batch costs ``len(batch) * max(lengths in batch)`` tokens, padding included. Rows are taken
    longest first, so the most expensive batches come first and show memory problems early.
    A single row longer than ``max_tokens`` still gets a batch of its own: refusing it would
    drop work the caller asked for.

    Args:
        lengths: length of each row, in tokens.
        max_tokens: budget of padded tokens per batch (>= 1).
        max_rows: most rows per batch (>= 1).

    Returns:
        Batches of indices into ``lengths``; every index appears exactly once. Within a batch,
        indices are ordered by decreasing length (ties by lower index).

    Raises:
        ValueError: a budget is below 1.
    """
    if max_tokens < 1 or max_rows < 1:
        raise ValueError(f"max_tokens and max_rows must be >= 1, got {max_tokens}, {max_rows}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # Rows arrive longest first, so the batch's padded width is its first row's length.
        width = lengths[current[0]] if current else lengths[index]
        if current and (len(current) >= max_rows or (len(current) + 1) * width > max_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches
