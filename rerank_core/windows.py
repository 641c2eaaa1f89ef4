"""Long documents as windows of tokens: each window scored as a document, the best one wins.

Definition, at the token level. A document part (``" {document}"``) is tokenized as usual. ``W``
is the document budget that truncation uses: what is left of ``max_length`` after the template
and the query's shared part, and at most ``max_tokens_per_doc`` where given. The document's
tokens are cut into windows of at most ``W`` tokens; window ``k`` starts at token
``k * (W - overlap)``. A next window is taken only while the previous one ended before the
document's last token, and at most ``max_windows`` windows in all; tokens past the last window
are dropped. Window 0 is therefore exactly the tail-truncated document of the model card, and a
document of at most ``W`` tokens has exactly one window.

Each window is scored as the official procedure scores a document whose token ids are exactly
that window (followed by the suffix), sharing the query's prefix like any other document; the
document's score is its best window's. With ``truncation_side="left"`` everything is mirrored:
window 0 is the document's last ``W`` tokens, and later windows move towards its start.

Nothing here needs torch: the ingress of the service windows documents before any model runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # prompt.py builds windowed queries: a runtime import would be circular
    from .prompt import EncodedQuery

TRUNCATION_SIDES = ("right", "left")


def window_bounds(
    num_tokens: int, width: int, overlap: int = 0, max_windows: int = 1, truncation_side: str = "right"
) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of a document's windows, window 0 first.

    Args:
        num_tokens: tokens of the document part.
        width: ``W``, the most tokens per window (>= 1).
        overlap: tokens shared by consecutive windows (``0 <= overlap < width`` when a second
            window is taken; a document that fits one window never looks at it).
        max_windows: most windows (>= 1).
        truncation_side: ``"right"`` (windows from the start; the end is dropped) or ``"left"``
            (mirrored: windows from the end; the start is dropped).

    Raises:
        ValueError: a bound is out of range.
    """
    if width < 1 or max_windows < 1:
        raise ValueError(f"width and max_windows must be >= 1, got {width}, {max_windows}")
    if truncation_side not in TRUNCATION_SIDES:
        raise ValueError(f"truncation_side must be one of {TRUNCATION_SIDES}, got {truncation_side!r}")
    starts = [0]
    while len(starts) < max_windows and starts[-1] + width < num_tokens:
        if not 0 <= overlap < width:
            raise ValueError(
                f"chunk overlap ({overlap} tokens) must be at least 0 and below the document budget "
                f"W = {width} tokens of this request"
            )
        starts.append(starts[-1] + width - overlap)
    bounds = [(start, min(start + width, num_tokens)) for start in starts]
    if truncation_side == "left":
        bounds = [(num_tokens - end, num_tokens - start) for start, end in bounds]
    return bounds


def char_span(offsets: Sequence[tuple[int, int]], start: int, end: int, text_length: int) -> tuple[int, int]:
    """Characters of a document covered by its tokens ``[start, end)``.

    ``offsets`` is the tokenizer's offset mapping of ``" " + document`` (the document part), so
    one character is taken off; the joining space itself maps to the document's start.
    """
    if start >= end:
        return (0, 0)
    first = max(0, offsets[start][0] - 1)
    last = min(text_length, max(0, offsets[end - 1][1] - 1))
    return (first, max(first, last))


@dataclass(frozen=True)
class DocumentScores:
    """Per document, in input order: its best window and that window's score.

    Attributes:
        logits: ``logit_yes - logit_no`` of the best window (the raw score).
        best_windows: which of the document's windows scored best (0 = the start, as the
            model card truncates; ties go to the earlier window).
        windows: how many windows each document had.
        spans: character ``(start, end)`` of the best window in the document, when asked for.
        tokens: tokens of every scored (query, window) sequence, as the model sees them.
    """

    logits: list[float]
    best_windows: list[int]
    windows: list[int]
    spans: list[tuple[int, int]] | None
    tokens: int

    def scores(self) -> list[float]:
        """Probabilities of "yes" (the sigmoid of :attr:`logits`), in [0, 1]."""
        from .head import probabilities

        return probabilities(self.logits)


@dataclass(frozen=True)
class WindowedQuery:
    """One query's documents as windows, ready for the forward pass.

    Attributes:
        encoded: one row per window (documents in input order, each document's windows in
            order); the forward pass scores windows as it scores documents.
        document_of: per row, the index of its document.
        spans: per row, the window's character span in its document; ``None`` unless asked for.
        num_documents: documents of the request.
    """

    encoded: EncodedQuery
    document_of: list[int]
    spans: list[tuple[int, int]] | None
    num_documents: int

    @property
    def num_windows(self) -> int:
        return len(self.document_of)

    def best(self, row_logits: Sequence[float]) -> DocumentScores:
        """Reduce per-window logits (one per row, in row order) to per-document results.

        The best window is the one with the highest logit, which is also the one with the
        highest probability (the sigmoid is monotonic).
        """
        if len(row_logits) != self.num_windows:
            raise ValueError(f"{len(row_logits)} window scores for {self.num_windows} windows")
        best_row: list[int | None] = [None] * self.num_documents
        counts = [0] * self.num_documents
        for row, document in enumerate(self.document_of):
            counts[document] += 1
            current = best_row[document]
            if current is None or row_logits[row] > row_logits[current]:
                best_row[document] = row
        first_row = {}
        for row, document in enumerate(self.document_of):
            first_row.setdefault(document, row)
        return DocumentScores(
            logits=[row_logits[row] for row in best_row],
            best_windows=[row - first_row[d] for d, row in enumerate(best_row)],
            windows=counts,
            spans=None if self.spans is None else [self.spans[row] for row in best_row],
            tokens=self.encoded.num_tokens(),
        )
