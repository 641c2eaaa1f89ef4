"""``rerank list`` and ``rerank download``: the registry and the local model cache."""

from __future__ import annotations

import argparse
import json
import sys

from rerank_core import registry

from .cache import cached_paths


def list_models(args: argparse.Namespace) -> int:
    cache_dir = args.cache_dir if args.cache_dir is not None else registry.default_cache_dir()
    rows = []
    for spec in registry.REGISTRY.values():
        rows.append({
            "name": spec.name,
            "hub_id": spec.hub_id,
            "parameters": spec.parameters,
            "default": spec.name == registry.DEFAULT_MODEL,
            "cached": cached_paths(spec.hub_id, cache_dir),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("NAME", "HUB ID", "PARAMS", "CACHED")
    lines = [
        (row["name"] + (" *" if row["default"] else ""), row["hub_id"], row["parameters"],
         ", ".join(row["cached"]) or "no")
        for row in rows
    ]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    for r in [header, *lines]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    where = f"cache directory {cache_dir}" if cache_dir else "the default ModelScope and Hugging Face caches"
    print(f"\n* default model. CACHED: the hubs whose cache holds the weights, looked up in {where}.")
    return 0


def download(args: argparse.Namespace) -> int:
    """Fetch ``args.model`` into the cache (or find it there) and print its local directory."""
    path = registry.resolve_source(args.model, hub=args.hub, cache_dir=args.cache_dir)
    print(path)
    sys.stdout.flush()
    return 0
