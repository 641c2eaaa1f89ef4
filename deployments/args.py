"""Typed arguments of the application builder (the ``args:`` of a Serve config file).

Serve validates the YAML ``args`` against :class:`AppArgs` because ``build_app`` annotates its
argument with it; a misspelled key fails at deploy time instead of being ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rerank_core.config import DEFAULT_MAX_BATCH_PAIRS, DEFAULT_MAX_BATCH_TOKENS, EngineConfig
from rerank_core.prompt import DEFAULT_MAX_LENGTH

DEFAULT_MAX_DOCUMENTS = 1000
DEFAULT_MAX_REQUEST_CHARS = 2_000_000
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_CHUNK_PAIRS = 16
DEFAULT_CHUNK_TOKENS = 8192
DEFAULT_REQUEST_TIMEOUT_S = 60.0
DEFAULT_RETRY_AFTER_S = 1
DEFAULT_MAX_CONCURRENT_REQUESTS = 64
DEFAULT_MAX_PAIRS = 4000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchingArgs(_Strict):
    """How a model replica batches chunks across requests (its Serve ``user_config``).

    Changing these in the config's ``deployments[].user_config`` applies without a restart.
    """

    max_batch_size: int = Field(64, gt=0, description="Most document pairs scored in one batch.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, le=10, description="How long a batch waits for more chunks before running."
    )


class ModelArgs(_Strict):
    """One served model; each gets its own autoscaled replica deployment."""

    name: str = Field(min_length=1, pattern=r"^[\w.\-]+$", description="What requests put in `model`.")
    source: str = Field(min_length=1, description="Registry name, hub id, or local directory.")
    aliases: list[str] = Field(default_factory=list, description="Other names requests may use.")
    hub: Literal["modelscope", "huggingface"] | None = Field(
        None, description="Hub for hub ids (default: $RERANK_HUB or modelscope)."
    )
    cache_dir: str | None = Field(None, description="Download cache (default: $RERANK_CACHE_DIR).")
    max_length: int = Field(DEFAULT_MAX_LENGTH, gt=0, description="Longest pair, in tokens.")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8", "fp8"] = Field(
        "auto",
        description="'auto': bfloat16 on CUDA and on CPUs with native bf16 (AMX, AVX512-BF16), else float32. "
        "'int8' (CPU) and 'fp8' (CUDA, compute capability 8.9+) quantize the decoder's linear layers (opt-in).",
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    max_batch_tokens: int = Field(
        DEFAULT_MAX_BATCH_TOKENS, gt=0, description="Tokens per forward pass (padding included in padded passes)."
    )
    max_batch_pairs: int = Field(DEFAULT_MAX_BATCH_PAIRS, gt=0, description="Pairs per forward pass.")
    max_padding: float | None = Field(
        None, ge=0, le=1, description="Largest share of padding in a padded forward pass (default: 0.1 on CPU, 0.5 on CUDA)."
    )
    packing: bool | None = Field(
        None, description="Packed forward passes: rows joined without padding (default: on for CPU, on for CUDA in bfloat16/float16, "
        "off in float32 on CUDA)."
    )
    batch_invariant: bool | None = Field(
        None,
        description="Scores bit-identical whatever else shares a forward pass (needs packing; default: off; "
        "costs about 15% of pairs/s on CPU).",
    )
    compile_layers: bool | None = Field(
        None,
        description="Decoder layers compiled by torch.compile, attention left eager (compiled at start-up; "
        "default: on for CPU in bfloat16/float16 with packed passes on CPUs with native bf16 (AMX, AVX512-BF16), "
        "off elsewhere; needs packing; eager layers if compiling fails).",
    )
    max_chunks_per_doc: int = Field(
        1, ge=1, description="Default most windows per long document; its score is the best window's "
        "(1: the document's start only, as the model card truncates).",
    )
    chunk_overlap_tokens: int = Field(
        0, ge=0, description="Tokens shared by consecutive windows of a document (below the document budget)."
    )
    batching: BatchingArgs = Field(default_factory=BatchingArgs)
    deployment: dict[str, Any] = Field(
        default_factory=dict,
        description="Serve deployment options of this model's replicas (num_replicas, "
        "autoscaling_config, ray_actor_options, max_ongoing_requests, max_queued_requests, ...).",
    )

    def engine_config(self) -> EngineConfig:
        """The engine settings of this model's replicas."""
        return EngineConfig(
            device=self.device,
            dtype=self.dtype,
            max_length=self.max_length,
            max_batch_tokens=self.max_batch_tokens,
            max_batch_pairs=self.max_batch_pairs,
            max_padding=self.max_padding,
            packing=self.packing,
            batch_invariant=self.batch_invariant,
            compile_layers=self.compile_layers,
            max_chunks_per_doc=self.max_chunks_per_doc,
            chunk_overlap_tokens=self.chunk_overlap_tokens,
        )


class AppArgs(_Strict):
    """Arguments of :func:`deployments.app.build_app`."""

    models: list[ModelArgs] = Field(min_length=1, description="Served models.")
    default_model: str | None = Field(None, description="Model for requests without `model` (default: first).")
    max_documents: int = Field(DEFAULT_MAX_DOCUMENTS, gt=0, description="Most documents per request (413).")
    max_request_chars: int = Field(
        DEFAULT_MAX_REQUEST_CHARS, gt=0, description="Most characters of query + documents (413)."
    )
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, gt=0, description="Largest request body (413).")
    max_pairs: int = Field(
        DEFAULT_MAX_PAIRS, gt=0, description="Most (query, window) pairs per request, windows of long documents "
        "counted (413).",
    )
    chunk_pairs: int = Field(DEFAULT_CHUNK_PAIRS, gt=0, description="Most documents per chunk sent to a replica.")
    chunk_tokens: int = Field(DEFAULT_CHUNK_TOKENS, gt=0, description="Padded document tokens per chunk.")
    request_timeout_s: float = Field(DEFAULT_REQUEST_TIMEOUT_S, gt=0, description="Answer 504 after this.")
    max_concurrent_requests: int = Field(
        DEFAULT_MAX_CONCURRENT_REQUESTS,
        gt=0,
        description="Rerank requests one ingress replica works on at once; more get 503 with "
        "Retry-After. Keep the ingress's max_ongoing_requests above it so that the excess reaches "
        "the ingress (JSON 503) instead of queueing in the proxy.",
    )
    retry_after_s: int = Field(DEFAULT_RETRY_AFTER_S, ge=0, description="Retry-After of 503 answers.")
    api_keys: list[str] = Field(default_factory=list, description="Accepted bearer tokens; empty: no auth.")
    api_keys_env: str | None = Field(
        None, description="Name of an environment variable holding comma-separated API keys."
    )
    ingress: dict[str, Any] = Field(default_factory=dict, description="Serve options of the ingress deployment.")

    @model_validator(mode="after")
    def _check_names(self):
        names = [n for m in self.models for n in (m.name, *m.aliases)]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names and aliases must be unique: {duplicates}")
        if self.default_model is not None and self.default_model not in names:
            raise ValueError(f"default_model {self.default_model!r} is not one of the models {names}")
        for m in self.models:
            if m.chunk_overlap_tokens >= m.max_length:
                raise ValueError(f"model {m.name!r}: chunk_overlap_tokens must be below max_length")
            if m.batching.max_batch_size < self.chunk_pairs:
                raise ValueError(
                    f"model {m.name!r}: batching.max_batch_size ({m.batching.max_batch_size}) must be "
                    f">= chunk_pairs ({self.chunk_pairs}), or chunks could never be batched"
                )
            try:  # the engine's own checks (e.g. settings that need packed passes), before any replica starts
                m.engine_config()
            except ValueError as e:
                raise ValueError(f"model {m.name!r}: {e}") from None
        return self

    def default_model_name(self) -> str:
        """The name of the model used when a request names none."""
        return self.default_model or self.models[0].name
