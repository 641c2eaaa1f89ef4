"""Packed attention of one layer in its CPU variants, side by side.

Run from the repository root:

    python bench/attention.py                 # 0.6B shape, bf16, 3 rounds, every variant
    python bench/attention.py --heads 32 --variants padded,unpadded

One sample is one layer's attention over 16 segments of 45..420 tokens (seeded), each with a
74-token prefix: one call of ``rerank_core.packing.segment_attention``, the function the model's
layers call. Variants:

* ``padded``: the defaults (query heads folded, key counts rounded up to ``packing.KEY_BLOCK``);
* ``unpadded``: folded, key counts as they are;
* ``unfolded``: neither (``packing.FOLD_MASK_ELEMENTS`` 0).

Each sample is the median of ``--calls`` calls; rounds alternate the order of the variants.
Printed: per-round medians in ms, each variant's speed against ``padded``, and the largest
difference of its output from ``padded``'s.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.hardware import summary  # noqa: E402
from rerank_core import packing  # noqa: E402
from rerank_core.memory import reuse_freed_memory  # noqa: E402
from rerank_core.packing import PrefixRef, Segments, segment_attention  # noqa: E402

PREFIX = 74


# name: (FOLD_MASK_ELEMENTS, KEY_BLOCK)
VARIANTS = {
    "padded": (packing.FOLD_MASK_ELEMENTS, packing.KEY_BLOCK),
    "unpadded": (packing.FOLD_MASK_ELEMENTS, 1),
    "unfolded": (0, 1),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=16, help="query heads (0.6B: 16; 4B, 8B: 32)")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    args = parser.parse_args(argv)
    print(summary(), flush=True)
    reuse_freed_memory()
    dtype = getattr(torch, args.dtype)
    rng = random.Random(0)
    lengths = [rng.randint(45, 420) for _ in range(16)]
    tokens = sum(lengths)
    torch.manual_seed(0)
    # Laid out as the model produces them: (1, tokens, heads, 128) seen as (1, heads, tokens, 128).
    q = torch.randn(1, tokens, args.heads, 128, dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(1, tokens, args.kv_heads, 128, dtype=dtype).transpose(1, 2) for _ in range(2))
    pk, pv = (torch.randn(1, PREFIX, args.kv_heads, 128, dtype=dtype).transpose(1, 2) for _ in range(2))
    segments = Segments(lengths, [PrefixRef(0, 0, PREFIX)] * len(lengths), [[(pk, pv)]])
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}

    layer = torch.nn.Module()
    layer.layer_idx = 0  # the layer whose recorded prefix keys the segments read

    def run(name: str) -> torch.Tensor:
        packing.FOLD_MASK_ELEMENTS, packing.KEY_BLOCK = variants[name]
        return segment_attention(layer, q, k, v, segments)[0]

    outputs = {name: run(name) for name in variants}
    print(f"segments {lengths} ({tokens} tokens), {args.heads}/{args.kv_heads} heads, {args.dtype}")
    first = next(iter(variants))
    for name in list(variants)[1:]:
        print(f"largest difference {name} vs {first}: {(outputs[name].float() - outputs[first].float()).abs().max().item():.2e}")
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        order = list(variants) if round_ % 2 == 0 else list(variants)[::-1]
        for name in order:
            times = []
            for _ in range(args.calls + 2):
                start = time.perf_counter()
                run(name)
                times.append(time.perf_counter() - start)
            samples[name].append(statistics.median(times[2:]) * 1e3)
    for name, values in samples.items():
        ratio = statistics.median(values) / statistics.median(samples[first])
        print(f"{name:9s} ms per layer: median {statistics.median(values):.2f} ({ratio:.2f}x the time of {first})  rounds "
              + ", ".join(f"{x:.2f}" for x in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
