"""Benchmark of long documents scored as windows (``max_chunks_per_doc``) on the engine (CPU).

Run from the repository root:

    python bench/long_docs.py              # 0.6B shape, max_length 1024, 16 documents of 3-4 windows
    python bench/long_docs.py --tiny --repeats 1 --documents 4 --max-length 256   # smoke run
    python bench/long_docs.py --json out.json

The checkpoint is the random 0.6B-shaped one of ``bench/engine.py`` (built once into
``~/.cache/qwen3-rerank-serve/bench-0.6b``; ``--checkpoint DIR`` for another), or with
``--tiny`` a tiny one built in a temporary directory (for a smoke run only).

Workload: one query and ``--documents`` documents of seeded English-like words, each long enough
to need 3 or 4 windows of the document budget ``W`` (``--max-length`` minus the template and the
query's shared part). Two ways to score the same windows, both from text, alternating over
``--repeats`` rounds after one warm-up each:

* **chunked**: ``Reranker.score(query, documents, max_chunks_per_doc=4)``: tokenize, cut into
  windows, score every window sharing the query's prefix, keep each document's best;
* **separate**: the windows' texts (from their character spans) as separate documents of one
  call, ``Reranker.score(query, window_texts, max_chunks_per_doc=1)``.

Reported: median seconds, documents/s and windows/s of each, the ratio separate/chunked time,
and the largest difference between a document's chunked score and the best of its windows scored
separately (a window's text re-tokenized alone may differ at its edges by a token, so this is a
sanity figure, not a parity check; tests/test_windows.py checks parity on token ids).
Target: chunked costs no more than separate (ratio >= 0.95 allowing for noise).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from engine import DEFAULT_CHECKPOINT, ensure_checkpoint, make_document  # noqa: E402

QUERY = "how do solar panels turn sunlight into electricity for a house"
MAX_CHUNKS = 4


def long_documents(reranker, count: int, seed: int = 0) -> list[str]:
    """``count`` documents needing 3 or 4 windows of this engine's document budget."""
    rng = random.Random(seed)
    windowed = reranker.encode_windows(QUERY, [""])
    width = reranker.max_length - len(windowed.encoded.shared) - len(reranker.encoder.suffix_ids)
    documents = []
    for i in range(count):
        target = width * (3 if i % 2 else 4) - rng.randint(1, width // 2)  # 2.5..4 W: 3 or 4 windows
        words = max(1, int(target / 1.3))
        text = make_document(rng, words)
        while len(reranker.encoder.tokenizer.encode(" " + text, add_special_tokens=False)) < target:
            words += 10
            text = make_document(random.Random(seed * 1000 + i), words)
        documents.append(text)
    return documents


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--tiny", action="store_true", help="a tiny random checkpoint (smoke run)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    from bench.hardware import describe, summary
    from rerank_core import Reranker

    hardware = describe()
    print(summary(hardware), flush=True)

    if args.tiny:
        from rerank_core.synthetic import build_checkpoint

        checkpoint = build_checkpoint(tempfile.mkdtemp(prefix="long-docs-"), shape="tiny", seed=0)
    else:
        checkpoint, _ = ensure_checkpoint(args.checkpoint)
    reranker = Reranker.load(str(checkpoint), device="cpu", dtype="float32", max_length=args.max_length)
    documents = long_documents(reranker, args.documents)
    windowed = reranker.encode_windows(QUERY, documents, max_chunks_per_doc=MAX_CHUNKS, return_spans=True)
    windows = windowed.num_windows
    texts = [documents[d][start:end] for d, (start, end) in zip(windowed.document_of, windowed.spans)]

    def chunked():
        return reranker.score(QUERY, documents, max_chunks_per_doc=MAX_CHUNKS)

    def separate():
        return reranker.score(QUERY, texts, max_chunks_per_doc=1)

    chunked(), separate()  # warm-up
    times = {"chunked": [], "separate": []}
    for round_ in range(args.repeats):
        order = ("chunked", "separate") if round_ % 2 == 0 else ("separate", "chunked")
        for name in order:
            seconds, value = timed(chunked if name == "chunked" else separate)
            times[name].append(seconds)
            if name == "chunked":
                chunked_scores = value
            else:
                separate_scores = value
    best_separate = [
        max(s for s, d in zip(separate_scores, windowed.document_of) if d == i) for i in range(len(documents))
    ]
    median = {name: statistics.median(values) for name, values in times.items()}
    figures = {
        "checkpoint": str(checkpoint),
        "max_length": args.max_length,
        "documents": len(documents),
        "windows": windows,
        "windows_per_document": [windowed.document_of.count(d) for d in range(len(documents))],
        "tokens_scored": windowed.encoded.num_tokens(),
        "repeats": args.repeats,
        "seconds": median,
        "documents_per_s": {name: len(documents) / t for name, t in median.items()},
        "windows_per_s": {name: windows / t for name, t in median.items()},
        "separate_over_chunked_time": median["separate"] / median["chunked"],
        "max_score_difference_vs_best_separate_window": max(
            abs(a - b) for a, b in zip(chunked_scores, best_separate)
        ),
        "hardware": hardware,
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
