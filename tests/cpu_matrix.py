"""Load and score a checkpoint under every CPU engine setting; one JSON object per setting on stdout.

``python -m tests.cpu_matrix CHECKPOINT``: for every ``dtype`` x ``batch_invariant`` x ``packing``
x ``compile_layers``, either the settings are refused (``refused``: the message) or the engine
loads and scores :data:`QUERY` against :data:`DOCS` together and one by one (``scores``, ``alone``),
with what it chose (``packing``, ``batch_invariant``, ``compiled``, ``reordered``, ``key_multiple``).
An error of any other kind is recorded as ``error``. Run in a process of its own by
``tests/test_cpu_matrix.py``, so that a ``ONEDNN_MAX_CPU_ISA`` set for it reaches oneDNN before
it starts, and so that its compilations do not use up the test process's recompile budget.
"""

from __future__ import annotations

import itertools
import json
import sys

import torch

from rerank_core import EngineConfig, Reranker
from rerank_core.cpu import cpu_features
from rerank_core.invariant import TiledLinear
from rerank_core.packing import key_multiple

DTYPES = ("float32", "bfloat16", "float16")
QUERY = "which rivers flow through the city"
DOCS = [
    "The Danube flows through Vienna, Bratislava, Budapest and Belgrade.",
    "A recipe for bread needs flour, water, salt and yeast.",
    "The Seine crosses Paris from east to west.",
    "music law cell energy the of and",
]


def settings():
    """Every combination, as ``EngineConfig`` keyword arguments."""
    for dtype, invariant, packing, compile_ in itertools.product(DTYPES, (False, True), (False, True), (False, True)):
        yield {"dtype": dtype, "batch_invariant": invariant, "packing": packing, "compile_layers": compile_}


def run(checkpoint: str, setting: dict) -> dict:
    out = {"setting": setting, "cpu": cpu_features().as_dict()}
    try:
        config = EngineConfig(device="cpu", **setting)
    except ValueError as e:
        return {**out, "refused": str(e)}
    try:
        engine = Reranker.load(checkpoint, config=config)
        scores = engine.score(QUERY, DOCS)
        alone = [engine.score(QUERY, [doc])[0] for doc in DOCS]
    except Exception as e:  # noqa: BLE001  (recorded for the test to report)
        return {**out, "error": f"{type(e).__name__}: {e}"}
    backbone = engine.scorer.backbone
    tiles = [m for m in backbone.modules() if isinstance(m, TiledLinear)]
    dtype = next(backbone.parameters()).dtype
    return {
        **out,
        "scores": scores,
        "alone": alone,
        "packing": engine.scorer.packing,
        "batch_invariant": engine.scorer.batch_invariant,
        "compiled": engine.compiled_layers,
        "compile_failure": engine.compiled_layers_failure,
        "reordered": bool(tiles) and all(t.prepacked for t in tiles),
        "key_multiple": key_multiple(torch.zeros(1, dtype=dtype)),
    }


def main(argv=None) -> int:
    checkpoint = (argv or sys.argv[1:])[0]
    for setting in settings():
        print(json.dumps(run(checkpoint, setting)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
