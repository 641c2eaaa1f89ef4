"""What ``rerank run`` prints: a table or the ``/rerank`` JSON body, and a progress bar."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Sequence
from typing import TextIO

DOC_WIDTH = 60
ELLIPSIS = "…"


def response_body(model: str, results: Sequence, num_tokens: int) -> dict:
    """The ``POST /rerank`` response shape, with each result's document included."""
    return {
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": model,
        "results": [
            {"index": r.index, "relevance_score": r.relevance_score, "document": r.document} for r in results
        ],
        "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
    }


def to_json(body: dict) -> str:
    return json.dumps(body, ensure_ascii=False, indent=2)


def clip(text: str, width: int = DOC_WIDTH) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``width`` with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1].rstrip() + ELLIPSIS


def table(body: dict) -> str:
    """Rank, score (4 decimals), index and the clipped document of each result."""
    results = body["results"]
    index_width = max([len("index")] + [len(str(r["index"])) for r in results])
    rank_width = max(len("rank"), len(str(len(results))))
    lines = [f"{'rank':>{rank_width}}  {'score':>6}  {'index':>{index_width}}  document"]
    for rank, r in enumerate(results, start=1):
        lines.append(
            f"{rank:>{rank_width}}  {r['relevance_score']:6.4f}  {r['index']:>{index_width}}  "
            f"{clip(r['document'])}".rstrip()
        )
    return "\n".join(lines)


class Progress:
    """A progress bar on stderr: ``tqdm`` when importable, else a small one of its own."""

    def __init__(self, total: int, description: str = "scoring", stream: TextIO | None = None):
        self.total = total
        self.done = 0
        self.description = description
        self.stream = stream or sys.stderr
        try:
            from tqdm import tqdm
        except ImportError:
            self._tqdm = None
            self._draw()
        else:
            self._tqdm = tqdm(total=total, desc=description, unit="doc", file=self.stream, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self._tqdm is not None:
            self._tqdm.update(n)
        else:
            self._draw()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, width: int = 30) -> None:
        filled = width * self.done // max(self.total, 1)
        percent = 100 * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r{self.description} [{bar}] {self.done}/{self.total} docs {percent:3d}%")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
