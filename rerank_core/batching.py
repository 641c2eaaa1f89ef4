"""Packing sequences of unequal length into forward passes.

One pure function, kept apart from the model so that it can be tested alone: sort by length so
that rows of similar length share a batch (little padding), cut the sorted run into batches under
a padded-token budget and a row cap, and let the caller restore the input order by index.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(
    lengths: Sequence[int], max_tokens: int, max_rows: int, max_padding: float = 1.0
) -> list[list[int]]:
    """Group row indices into batches whose padded size fits a budget.

    A batch costs ``len(batch) * max(lengths in batch)`` tokens, padding included. Rows are taken
    longest first, so the most expensive batches come first and show memory problems early.
    A single row longer than ``max_tokens`` still gets a batch of its own: refusing it would
    drop work the caller asked for.

    Args:
        lengths: length of each row, in tokens.
        max_tokens: budget of padded tokens per batch (>= 1).
        max_rows: most rows per batch (>= 1).
        max_padding: largest share of a batch's padded tokens that may be padding, in [0, 1];
            a row that would push its batch past it starts a new batch. Padding is computed like
            real tokens, so where a forward pass is already efficient at one row (a CPU), little
            padding is worth allowing; where passes have a high fixed cost (a GPU), more is.

    Returns:
        Batches of indices into ``lengths``; every index appears exactly once. Within a batch,
        indices are ordered by decreasing length (ties by lower index).

    Raises:
        ValueError: a budget is below 1, or ``max_padding`` is outside [0, 1].
    """
    if max_tokens < 1 or max_rows < 1:
        raise ValueError(f"max_tokens and max_rows must be >= 1, got {max_tokens}, {max_rows}")
    if not 0.0 <= max_padding <= 1.0:
        raise ValueError(f"max_padding must be in [0, 1], got {max_padding}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for index in order:
        # Rows arrive longest first, so the batch's padded width is its first row's length.
        width = lengths[current[0]] if current else lengths[index]
        padded = (len(current) + 1) * width
        too_padded = padded > 0 and padded - (real + lengths[index]) > max_padding * padded
        if current and (len(current) >= max_rows or padded > max_tokens or too_padded):
            batches.append(current)
            current, real = [], 0
        current.append(index)
        real += lengths[index]
    if current:
        batches.append(current)
    return batches


def plan_packed(lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Group row indices into packed passes (rows concatenated, no padding) under a budget.

    First-fit decreasing: rows are taken longest first and each goes into the first pass that
    still has room for its tokens and one more row, so passes come out few and full (a packed
    pass gets faster per token as it grows). A single row longer than ``max_tokens`` still gets
    a pass of its own.

    Args:
        lengths: length of each row, in tokens.
        max_tokens: most tokens per pass (>= 1).
        max_rows: most rows per pass (>= 1).

    Returns:
        Passes of indices into ``lengths``; every index appears exactly once. Within a pass,
        indices are ordered by decreasing length (ties by lower index).

    Raises:
        ValueError: a budget is below 1.
    """
    if max_tokens < 1 or max_rows < 1:
        raise ValueError(f"max_tokens and max_rows must be >= 1, got {max_tokens}, {max_rows}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    passes: list[list[int]] = []
    totals: list[int] = []
    for index in order:
        for p, members in enumerate(passes):
            if len(members) < max_rows and totals[p] + lengths[index] <= max_tokens:
                members.append(index)
                totals[p] += lengths[index]
                break
        else:
            passes.append([index])
            totals.append(lengths[index])
    return passes
