"""Known Qwen3-Reranker checkpoints and turning a model *source* into a local directory.

A source is one of:

* a registry name (``qwen3-reranker-0.6b``), mapped to its hub id;
* a hub id (``Qwen/Qwen3-Reranker-0.6B``), downloaded from ModelScope (default) or the
  Hugging Face hub into a cache directory;
* a local directory holding ``config.json`` and the tokenizer files, loaded as is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HUBS = ("modelscope", "huggingface")
DEFAULT_HUB = "modelscope"
HUB_ENV = "RERANK_HUB"
CACHE_ENV = "RERANK_CACHE_DIR"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSpec:
    """One released checkpoint."""

    name: str
    hub_id: str
    parameters: str
    layers: int
    hidden_size: int


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("qwen3-reranker-0.6b", "Qwen/Qwen3-Reranker-0.6B", "0.6B", 28, 1024),
        ModelSpec("qwen3-reranker-4b", "Qwen/Qwen3-Reranker-4B", "4B", 36, 2560),
        ModelSpec("qwen3-reranker-8b", "Qwen/Qwen3-Reranker-8B", "8B", 36, 4096),
    )
}
DEFAULT_MODEL = "qwen3-reranker-0.6b"
# What a tokenizer needs from a checkpoint: config and tokenizer files, no weights. A process that
# only tokenizes (the service's ingress) downloads these instead of gigabytes of weights.
TOKENIZER_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken")


class ModelSourceError(RuntimeError):
    """A model source could not be turned into a local checkpoint directory."""


def resolve_hub_id(source: str) -> str | None:
    """The hub id a registry name or hub id stands for; ``None`` if ``source`` is neither."""
    spec = REGISTRY.get(source.lower())
    if spec is not None:
        return spec.hub_id
    return source if _HUB_ID.match(source) else None


def default_hub() -> str:
    """The hub to download from: ``$RERANK_HUB`` or ModelScope."""
    return os.environ.get(HUB_ENV, DEFAULT_HUB)


def default_cache_dir() -> str | None:
    """``$RERANK_CACHE_DIR``, or ``None`` for the hub library's own default cache."""
    return os.environ.get(CACHE_ENV) or None


def resolve_source(
    source: str,
    hub: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    downloader=None,
    files: Sequence[str] | None = None,
) -> Path:
    """Return a local directory holding the checkpoint named by ``source``.

    Args:
        source: registry name, hub id, or local directory.
        hub: ``"modelscope"`` or ``"huggingface"``; ``None`` means :func:`default_hub`.
        cache_dir: where downloads go; ``None`` means :func:`default_cache_dir`.
        downloader: ``downloader(hub_id, hub, cache_dir, files) -> path``; defaults to
            :func:`download`. Injected in tests, where no hub is reachable.
        files: glob patterns of the files to download (e.g. :data:`TOKENIZER_FILES`); ``None``:
            the whole checkpoint. A local directory is returned as it is either way.

    Raises:
        ModelSourceError: the source is unknown, the directory is not a checkpoint, or the
            download failed; the message names the id, the hub and the cause, and what can work
            instead (the other hub, a cache directory, a local directory; :func:`ways_out`).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} is a directory but holds no config.json checkpoint")
        return path
    hub_id = resolve_hub_id(source)
    if hub_id is None:
        known = ", ".join(REGISTRY)
        raise ModelSourceError(
            f"unknown model source {source!r}: not a directory, a known name ({known}) "
            f"or a hub id like 'Qwen/Qwen3-Reranker-0.6B'"
        )
    hub = hub or default_hub()
    if hub not in HUBS:
        raise ModelSourceError(f"unknown hub {hub!r}; choose one of {', '.join(HUBS)}")
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    try:
        return Path((downloader or download)(hub_id, hub, cache_dir, files))
    except Exception as e:  # noqa: BLE001 - hub clients raise many unrelated types
        raise ModelSourceError(f"could not download {hub_id!r} from {hub} ({describe_error(e)}). {ways_out(hub)}") from e


def ways_out(failed_hub: str) -> str:
    """What can work when a download from ``failed_hub`` failed (never the same download again)."""
    other = next(h for h in HUBS if h != failed_hub)
    return (
        f"What can work: the other hub (--hub {other}, or {HUB_ENV}={other}, or `hub: {other}` in a "
        f"Serve config's model entry); a cache that already holds the checkpoint (--cache-dir DIR or "
        f"{CACHE_ENV}); or a local checkpoint directory as the model source (--model DIR)."
    )


def describe_error(error: BaseException, limit: int = 200) -> str:
    """``Type: message`` of ``error`` on one line, at most ``limit`` characters, and of its root
    cause when that is another exception (hub clients wrap the socket error that says it all)."""

    def short(e: BaseException) -> str:
        text = f"{type(e).__name__}: {' '.join(str(e).split())}"
        return text if len(text) <= limit else text[: limit - 1] + "…"

    root, seen = error, {id(error)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        root = nxt
        seen.add(id(root))
    return short(error) if root is error else f"{short(error)}; caused by {short(root)}"


def download(
    hub_id: str, hub: str, cache_dir: str | os.PathLike | None = None, files: Sequence[str] | None = None
) -> str:
    """Download (or find in the cache) ``hub_id`` from ``hub``; returns the local directory.

    ``files``: glob patterns of the files to fetch (``None``: all).
    """
    patterns = list(files) if files is not None else None
    if hub == "modelscope":
        from modelscope import snapshot_download

        return snapshot_download(hub_id, cache_dir=cache_dir, allow_patterns=patterns)
    from huggingface_hub import snapshot_download

    return snapshot_download(hub_id, cache_dir=cache_dir, allow_patterns=patterns)
