"""Is a hub id already in the local ModelScope or Hugging Face cache? Files only, no network.

ModelScope has moved its cache more than once; every layout its clients read is probed:

* ``{base}/models/{owner}--{name}/snapshots/{revision}/`` (modelscope-hub, modelscope >= 1.38)
* ``{base}/models/{owner}/{name}/`` with dots in ``name`` written ``___`` (1.2x - 1.37)
* ``{base}/hub/models/{owner}/{name}/`` (the same, under the old default ``~/.cache/modelscope/hub``)
* ``{base}/{owner}/{name}/``, ``{base}/hub/{owner}/{name}/`` (older still)

where ``base`` is ``cache_dir``, else ``$MODELSCOPE_CACHE``, else ``~/.cache/modelscope``.

Hugging Face: ``huggingface_hub.try_to_load_from_cache`` (reads the cache, never the network)
in ``cache_dir``, else in the default cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ...).

A directory counts as cached when it holds ``config.json`` and a weights file.
"""

from __future__ import annotations

import os
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def is_checkpoint(path: Path) -> bool:
    try:
        return (path / "config.json").is_file() and any(
            any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS
        )
    except OSError:
        return False


def modelscope_candidates(hub_id: str, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories where ModelScope may hold ``hub_id``, most recent layout first."""
    if cache_dir is not None:
        base = Path(cache_dir).expanduser()
    else:
        base = Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope").expanduser()
    owner, _, name = hub_id.partition("/")
    names = dict.fromkeys([name.replace(".", "___"), name])  # masked first, no duplicates
    snapshots = base / "models" / f"{owner}--{name}" / "snapshots"
    candidates = sorted(snapshots.glob("*"), key=_mtime, reverse=True) if snapshots.is_dir() else []
    for prefix in (base / "models", base / "hub" / "models", base, base / "hub"):
        candidates += [prefix / owner / n for n in names]
    return candidates


def modelscope_path(hub_id: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    return next((p for p in modelscope_candidates(hub_id, cache_dir) if is_checkpoint(p)), None)


def huggingface_path(hub_id: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(hub_id, "config.json", cache_dir=cache_dir)
    except (OSError, ValueError):
        return None
    if not isinstance(found, str):  # None: unknown; a sentinel: known not to exist
        return None
    snapshot = Path(found).parent
    return snapshot if is_checkpoint(snapshot) else None


def cached_paths(hub_id: str, cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """``{hub: local directory}`` for each hub whose cache holds ``hub_id``."""
    found = {"modelscope": modelscope_path(hub_id, cache_dir), "huggingface": huggingface_path(hub_id, cache_dir)}
    return {hub: str(path) for hub, path in found.items() if path is not None}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
