"""The public engine: :class:`Reranker` loads a Qwen3-Reranker checkpoint and scores documents."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import replace

from .compiled import compile_layers, compiled, uncompile_layers
from .config import EngineConfig
from .errors import error_summary
from .forward import PairScorer
from .head import YesNoHead, answer_token_ids
from .invariant import tile_linear_layers, untile_linear_layers
from .pairs import group_by_query
from .prompt import EncodedQuery, PromptEncoder
from .quantized import cast_around_embeddings, check_device, compute_dtype, quantize_decoder, quantized
from .ranking import RankResult, rank
from .registry import TOKENIZER_FILES, ModelSourceError, resolve_source
from .varlen import VarlenAttention, checked_scorer
from .windows import DocumentScores, WindowedQuery

log = logging.getLogger(__name__)

_PROBE = ("What is the capital of France?", "Paris is the capital and largest city of France.")


def load_encoder(source: str | os.PathLike, max_length: int, hub=None, cache_dir=None) -> PromptEncoder:
    """Load only the tokenizer of ``source`` as a :class:`PromptEncoder`.

    A hub source downloads only config and tokenizer files
    (:data:`~rerank_core.registry.TOKENIZER_FILES`), no weights.

    Raises:
        ModelSourceError: see :func:`~rerank_core.registry.resolve_source`, or unreadable files.
    """
    path = resolve_source(str(source), hub=hub, cache_dir=cache_dir, files=TOKENIZER_FILES)
    return PromptEncoder(_load_tokenizer(path), max_length)


def _load_tokenizer(path):
    """The checkpoint's tokenizer; unreadable files become a :class:`ModelSourceError`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"cannot load a tokenizer from {path}: {e}") from e


def validate_request(query, documents, instruction=None) -> None:
    """Check the inputs of a scoring call.

    Raises:
        ValueError: empty or non-string query, no documents, a non-string document, or an
            instruction that is neither ``None`` nor a non-empty string.
    """
    if not isinstance(query, str) or not query.strip():
        raise ValueError("query must be a non-empty string")
    if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
        raise ValueError("documents must be a list of strings")
    if len(documents) == 0:
        raise ValueError("documents must not be empty")
    for i, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise ValueError(f"documents[{i}] must be a string, got {type(doc).__name__}")
    if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
        raise ValueError("instruction must be a non-empty string or None (the default instruction)")


class Reranker:
    """Scores (query, document) pairs with a Qwen3-Reranker checkpoint.

    Build with :meth:`load`. Scores are the model's probability of answering "yes", exactly as
    the model card defines them (up to floating-point rounding).
    """

    def __init__(self, model, tokenizer, config: EngineConfig, name: str = "qwen3-reranker", varlen_kernel=None):
        self.name = name
        self.config = config
        self.encoder = PromptEncoder(tokenizer, config.max_length)
        yes_id, no_id = answer_token_ids(tokenizer)
        device = next(model.parameters()).device
        if config.quantization and not quantized(model.get_decoder()):
            # Quantized once, here, from the weights as loaded (bf16 from Reranker.load, as released);
            # the layers left in float then take the compute dtype, the embedding tables excepted.
            quantize_decoder(model.get_decoder(), config.quantization, device, tokenizer)
            cast_around_embeddings(model, config.torch_dtype())
        dtype = compute_dtype(model.get_decoder())
        head = YesNoHead(model.get_output_embeddings().weight, yes_id, no_id).to(device)

        packing = config.packed(device, dtype)
        # Batch invariance needs fixed-tile linear layers. Both scorers below share one backbone,
        # so the layers are tiled here, once, for the packed scorer that needs them, and put back
        # if the varlen check hands the work to padded passes (which promise no invariance).
        invariant = config.invariant(device, dtype)  # False wherever packing resolves off
        # int8 layers sum exactly in integers: invariant as they are (rerank_core.quantized).
        if invariant and not quantized(model.get_decoder()):
            tile_linear_layers(model.get_decoder(), config.tile_rows)

        def scorer(packing: bool, packed_attention=None) -> PairScorer:
            # Only the decoder and the one-row head are kept: the vocabulary projection is never run.
            return PairScorer(
                model.get_decoder(), head, config.max_batch_tokens, config.max_batch_pairs,
                config.share_prefix, config.padding_share(device), packing, packed_attention,
                batch_invariant=packing and invariant, reuse_memory=config.reuse_freed_memory,
            )

        # Why the varlen packed path was replaced by padded passes at start-up (None: it was not).
        self.packed_check_failure: str | None = None
        # The largest |packed - padded| probe score difference the check found (None: no check ran).
        self.packed_check_difference: float | None = None
        if packing and config.packed_attention_for(device, dtype) == "varlen":
            report: dict = {}
            self.scorer, self.packed_check_failure = checked_scorer(
                scorer(True, VarlenAttention(varlen_kernel)), scorer(False), self.encoder.encode, report=report
            )
            self.packed_check_difference = report.get("max_abs_diff")
            if invariant and not self.scorer.packing and untile_linear_layers(model.get_decoder()):
                log.warning("padded passes run over weights reordered for tiles; their products stay tiled")
        else:
            self.scorer = scorer(packing)
        self.device = device
        # Why compiled layers were asked for but the eager ones run (None: they were not).
        self.compiled_layers_failure: str | None = None
        decoder = model.get_decoder()
        # Padded passes (also a varlen path replaced at start-up) are never compiled.
        compile_ = (
            config.compiled_layers(device, dtype) and self.scorer.packing and compile_layers(decoder) > 0
        )
        if config.compile_layers and not self.scorer.packing:
            # Asked for, but this engine runs padded passes (packing resolved off for the device and
            # dtype, or the varlen check fell back): said, not silently dropped.
            self.compiled_layers_failure = "padded passes are never compiled"
            log.warning("compile_layers is on but this engine runs padded passes; running the layers eagerly")
        try:
            # The probe also compiles the layers now rather than in the first request.
            self._probe_score = self.score(_PROBE[0], [_PROBE[1]])[0]
        except Exception as e:  # noqa: BLE001  (any compile failure: a missing compiler, an inductor bug)
            if not compile_:
                raise
            uncompile_layers(decoder)
            self.compiled_layers_failure = error_summary(e)
            log.warning("compiling the decoder layers failed (%s); running them eagerly", self.compiled_layers_failure)
            self._probe_score = self.score(_PROBE[0], [_PROBE[1]])[0]

    @property
    def compiled_layers(self) -> bool:
        """Whether the decoder layers run compiled (:mod:`rerank_core.compiled`)."""
        return compiled(self.scorer.backbone)

    @classmethod
    def load(
        cls,
        source: str | os.PathLike,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int | None = None,
        *,
        hub: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        config: EngineConfig | None = None,
        varlen_kernel=None,
    ) -> Reranker:
        """Load a checkpoint from a registry name, hub id or local directory.

        Args:
            source: see :func:`~rerank_core.registry.resolve_source`.
            device, dtype, max_length: override the fields of ``config`` when given (its
                defaults: ``"auto"``, ``"auto"``, 8192).
            hub: ``"modelscope"`` (default) or ``"huggingface"`` for hub ids.
            cache_dir: where downloads go.
            config: engine settings (batch budgets, prefix sharing); defaults otherwise.
            varlen_kernel: the kernel of the varlen packed path (``config.packed_attention``),
                with the signature of ``torch.nn.attention.varlen.varlen_attn`` (the default);
                e.g. :func:`~rerank_core.varlen.reference_varlen_attn` to run that path on CPU.

        Raises:
            ModelSourceError: the source cannot be found, downloaded or read.
            ValueError: bad settings, or a checkpoint that is not a Qwen3 causal LM reranker.
        """
        from transformers import AutoModelForCausalLM

        given = {"device": device, "dtype": dtype, "max_length": max_length}
        overrides = {k: v for k, v in given.items() if v is not None}
        config = replace(config or EngineConfig(), **overrides)
        path = resolve_source(str(source), hub=hub, cache_dir=cache_dir)
        torch_device = config.torch_device()
        if config.quantization:
            check_device(config.quantization, torch_device)  # before the weights are read
        tokenizer = _load_tokenizer(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=config.load_dtype(), attn_implementation="sdpa"
            )
        except (OSError, ValueError) as e:
            raise ModelSourceError(f"cannot load a checkpoint from {path}: {e}") from e
        architectures = getattr(model.config, "architectures", None) or []
        if not any(a.endswith("ForCausalLM") for a in architectures):
            raise ValueError(
                f"{path} holds {architectures}, not a causal LM; Qwen3-Reranker checkpoints are "
                f"Qwen3ForCausalLM scored by the probability of 'yes'"
            )
        model.to(torch_device).eval()
        return cls(model, tokenizer, config, name=str(source), varlen_kernel=varlen_kernel)

    def encode(self, query: str, documents: Sequence[str], instruction: str | None = None) -> EncodedQuery:
        """Validate and tokenize one query with its documents (see :class:`PromptEncoder`).

        Raises:
            ValueError: invalid inputs (see :func:`validate_request`), or a query too long to
                leave room for any document (:class:`~rerank_core.prompt.QueryTooLongError`).
        """
        validate_request(query, documents, instruction)
        return self.encoder.encode(query, documents, instruction)

    def encode_windows(
        self,
        query: str,
        documents: Sequence[str],
        instruction: str | None = None,
        *,
        max_chunks_per_doc: int | None = None,
        max_tokens_per_doc: int | None = None,
        truncation_side: str = "right",
        return_spans: bool = False,
    ) -> WindowedQuery:
        """Validate and tokenize one query with its documents as windows (:mod:`rerank_core.windows`).

        Args:
            max_chunks_per_doc: most windows per document (default: the config's; 1 is the
                model card's tail truncation).
            max_tokens_per_doc: cut each window to this many tokens (and to ``max_length``).
            truncation_side: ``"right"`` drops a document's end (the model card), ``"left"`` its start.
            return_spans: compute each window's character span in its document.

        Raises:
            ValueError: see :meth:`encode`; or a bound below 1, or the config's overlap not below
                this request's document budget.
        """
        validate_request(query, documents, instruction)
        for name, value in (("max_chunks_per_doc", max_chunks_per_doc), ("max_tokens_per_doc", max_tokens_per_doc)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        return self.encoder.encode_windows(
            query, documents, instruction,
            max_document_tokens=max_tokens_per_doc,
            max_windows=max_chunks_per_doc or self.config.max_chunks_per_doc,
            overlap=self.config.chunk_overlap_tokens,
            truncation_side=truncation_side,
            spans=return_spans,
        )

    def score_encoded(self, queries: Sequence[EncodedQuery]) -> list[list[float]]:
        """Scores for already-encoded queries, one list per query in input order."""
        return self.scorer.score(queries).scores

    def score_windowed(self, windowed: WindowedQuery) -> DocumentScores:
        """Everything known about each document's score (logits, best windows, spans, tokens)
        for documents encoded by :meth:`encode_windows`."""
        return windowed.best(self.scorer.score([windowed.encoded]).logits[0])

    def score(
        self,
        query: str,
        documents: Sequence[str],
        instruction: str | None = None,
        *,
        max_chunks_per_doc: int | None = None,
        max_tokens_per_doc: int | None = None,
        raw_scores: bool = False,
    ) -> list[float]:
        """Relevance of each document to ``query``, in input order, each in [0, 1].

        A document's score is its best window's (:mod:`rerank_core.windows`); with one window
        (the default config) that is the model card's score of the tail-truncated document.

        Args:
            raw_scores: return ``logit_yes - logit_no`` instead of the probability.

        Raises:
            ValueError: see :meth:`encode_windows`.
        """
        result = self.score_windowed(self.encode_windows(
            query, documents, instruction, max_chunks_per_doc=max_chunks_per_doc, max_tokens_per_doc=max_tokens_per_doc
        ))
        return result.logits if raw_scores else result.scores()

    def score_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        instruction: str | None = None,
        *,
        max_chunks_per_doc: int | None = None,
        raw_scores: bool = False,
    ) -> list[float]:
        """Scores of many ``(query, document)`` pairs, in input order.

        Pairs are grouped by query, so each distinct query's shared part runs once, and every
        group is scored in the same forward passes. Each score equals :meth:`score` of the pair.

        Raises:
            ValueError: no pairs, an item that is not a ``(query, document)`` pair of strings,
                or see :meth:`encode_windows`.
        """
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
            raise ValueError("pairs must be a non-empty list of (query, document) pairs")
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"pairs[{i}] must be a (query, document) pair")
        groups = group_by_query([query for query, _ in pairs])
        windowed = [
            self.encode_windows(pairs[g[0]][0], [pairs[i][1] for i in g], instruction,
                                max_chunks_per_doc=max_chunks_per_doc)
            for g in groups
        ]
        logits = self.scorer.score([w.encoded for w in windowed]).logits
        out = [0.0] * len(pairs)
        for group, w, row_logits in zip(groups, windowed, logits):
            best = w.best(row_logits)
            for i, value in zip(group, best.logits if raw_scores else best.scores()):
                out[i] = value
        return out

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        instruction: str | None = None,
        return_documents: bool = False,
        *,
        max_chunks_per_doc: int | None = None,
        return_spans: bool = False,
    ) -> list[RankResult]:
        """Documents ranked by relevance: highest score first, ties by lower index.

        Args:
            top_k: keep this many results (``None``: all).
            return_documents: attach each document's text to its result.
            max_chunks_per_doc: see :meth:`encode_windows`.
            return_spans: attach the character span of each document's best window.

        Raises:
            ValueError: see :meth:`encode_windows`, or ``top_k < 1``.
        """
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        result = self.score_windowed(self.encode_windows(
            query, documents, instruction, max_chunks_per_doc=max_chunks_per_doc, return_spans=return_spans
        ))
        return rank(result.scores(), list(documents) if return_documents else None, top_k, result.spans)

    def check_health(self) -> None:
        """Re-score a fixed pair and compare with the score taken at load time.

        Raises:
            RuntimeError: the device fails or the model no longer gives the same score.
        """
        score = self.score(_PROBE[0], [_PROBE[1]])[0]
        if not math.isfinite(score) or abs(score - self._probe_score) > 1e-3:
            raise RuntimeError(f"health probe scored {score}, expected {self._probe_score}")

    @property
    def max_length(self) -> int:
        return self.config.max_length
