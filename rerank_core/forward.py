"""The forward pass: token ids in, yes-minus-no logits out.

:class:`PairScorer` takes already-tokenized :class:`~rerank_core.prompt.EncodedQuery` objects, so
that tokenization can run in another process than the model. Three things make it fast without
changing a score beyond rounding:

* the final hidden state of each row's last real token goes through a one-row head
  (:class:`~rerank_core.head.YesNoHead`) instead of the full vocabulary projection, and packed
  passes with per-segment attention (CPU) run their last decoder layer for those rows only
  (:mod:`~rerank_core.kept_rows`);
* rows are grouped into forward passes under a token budget and a row cap (packed passes:
  :func:`~rerank_core.batching.plan_packed`; padded ones: sorted by length,
  :func:`~rerank_core.batching.plan_batches`), then scattered back to input order;
* the part shared by all documents of a query runs once; its keys and values are reused by every
  document of that query (RoPE is relative, so placing the document at the positions that follow
  the shared part reproduces the full sequence exactly). Packed passes do this for queries with
  two documents or more; a single document runs as one whole pair. Where the token budget has
  room, a shared part runs as a leading segment of its documents' pass rather than in a pass of
  its own: a pass of a few dozen tokens reads every weight for little work (on CPU in bf16 the
  74-token prefix pass of an 8-document call took 11 % of it).

Two layouts run the same computation. *Packed* (:mod:`rerank_core.packing`): a pass concatenates
its rows into one unpadded sequence and attention runs per row; no padding is computed and every
linear layer is one large product. *Padded*: rows are right-padded into a rectangle (with causal
attention a real token never sees the padding after it, so the last real token of row ``r`` sits
at ``length[r] - 1``) and attention is one call per layer; this suits devices where many small
attention calls cost more than some padding (a GPU).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from .batching import plan_batches, plan_packed
from .head import YesNoHead, probabilities
from .invariant import tiled
from .kept_rows import forward_kept_rows
from .kept_rows import supports as kept_rows_supported
from .memory import release_freed_memory, reuse_freed_memory
from .packing import ATTENTION_NAME, PrefixRef, Segments
from .prompt import EncodedQuery
from .quantized import quantized
from .staging import Staging


class _PrefixKV:
    """A minimal stand-in for a transformers ``Cache`` holding precomputed prefix keys/values.

    With ``past`` set, each attention layer sees ``past + new`` keys; without, it records the new
    keys and values (the prefix pass). Nothing is appended between calls: each batch gets its own
    object, so the prefix tensors are shared read-only.
    """

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.past = past
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, key, value, layer_idx, *args, **kwargs):
        if self.past is None:
            self.recorded.append((key, value))
            return key, value
        past_key, past_value = self.past[layer_idx]
        return torch.cat([past_key, key], dim=-2), torch.cat([past_value, value], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.past is None else self.past[0][0].shape[-2]


@dataclass
class _Prefixes:
    """Keys/values of every query's shared part, right-padded and stacked per prefix batch."""

    lengths: list[int]  # per query
    location: list[tuple[int, int]]  # per query: (prefix batch, row within it)
    batches: list[list[tuple[torch.Tensor, torch.Tensor]]]  # per prefix batch, per layer


@dataclass(frozen=True)
class ForwardStats:
    """What one :meth:`PairScorer.score` call did, for metrics and tests."""

    pairs: int
    forward_passes: int
    tokens: int  # real tokens run through the model
    padded_tokens: int  # tokens including padding


@dataclass(frozen=True)
class BatchScores:
    """Result of :meth:`PairScorer.score`: per query, per document, ``logit_yes - logit_no``."""

    logits: list[list[float]]
    stats: ForwardStats

    @property
    def scores(self) -> list[list[float]]:
        """Per query, per document, the yes-probability."""
        return [probabilities(row) for row in self.logits]


class PairScorer:
    """Runs a Qwen3 backbone and the yes/no head over encoded pairs.

    Args:
        backbone: the ``Qwen3Model`` (decoder without LM head), in eval mode, on ``device``.
        head: the yes/no head, on ``device``.
        max_batch_tokens: tokens per forward pass, padding included in padded passes (a longer
            single row still runs alone).
        max_batch_pairs: rows per forward pass.
        share_prefix: compute each query's shared part once (exact up to rounding).
        max_padding: largest share of padding in a padded forward pass (see
            :func:`~rerank_core.batching.plan_batches`).
        packing: run packed passes (rows concatenated, attention per row) instead of padded ones.
            This sets the backbone's attention implementation to
            :data:`~rerank_core.packing.ATTENTION_NAME` (its config is shared with the model that
            holds it), which behaves as SDPA for any other input.
        packed_attention: how packed passes run attention: ``None`` for one SDPA call per row
            (:mod:`rerank_core.packing`), or an object with a ``name`` (a registered attention
            implementation), ``plan(segments)`` returning the pass's layout as host arrays
            (:class:`~rerank_core.varlen.HostLayout`) and ``prepare(segments, layout)``
            returning the mask that implementation takes, given that layout on the device
            (:class:`~rerank_core.varlen.VarlenAttention`: one variable-length kernel call per
            layer, for CUDA).
        batch_invariant: make every score bit-identical whatever else shares its pass (needs
            ``packing``, and a backbone whose linear layers the caller made fixed-tile ones with
            :func:`~rerank_core.invariant.tile_linear_layers`): a query's shared part always runs
            as a prefix, also for a single document, so that a document takes the same path alone
            or not.
        reuse_memory: on CPU, let glibc reuse freed activations from layer to layer and hand the
            free pages back after each :meth:`score` call (:mod:`rerank_core.memory`).
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        head: YesNoHead,
        max_batch_tokens: int,
        max_batch_pairs: int,
        share_prefix: bool = True,
        max_padding: float = 1.0,
        packing: bool = False,
        packed_attention=None,
        batch_invariant: bool = False,
        reuse_memory: bool = False,
    ):
        layer_types = set(getattr(backbone.config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise ValueError(f"only full-attention models are supported, got {layer_types}")
        self.backbone = backbone
        self.head = head
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_pairs = max_batch_pairs
        self.share_prefix = share_prefix
        self.max_padding = max_padding
        self.packing = packing
        if batch_invariant and not packing:
            raise ValueError("batch_invariant needs packed passes")
        if batch_invariant and not (tiled(backbone) or quantized(backbone)):
            raise ValueError(
                "batch_invariant needs the backbone's linear layers tiled (invariant.tile_linear_layers) "
                "or in int8 (quantized.quantize_int8)"
            )
        self.batch_invariant = batch_invariant
        self.packed_attention = packed_attention
        if packing:
            # The packed attention function hands any other mask to stock SDPA, so the backbone
            # behaves as before outside packed passes.
            backbone.set_attn_implementation(packed_attention.name if packed_attention else ATTENTION_NAME)
        self.device = next(backbone.parameters()).device
        # A pass's integer inputs reach the device in one transfer that does not wait for the
        # device (rerank_core.staging), so the host prepares the next pass while one runs.
        self.staging = Staging(self.device)
        # transformers renamed the forward argument `past_key_values` to `cache` (5.x).
        params = inspect.signature(backbone.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.reuse_memory = reuse_memory and self.device.type == "cpu" and reuse_freed_memory()
        # Packed passes with per-segment SDPA run their last layer for the rows a score reads only
        # (rerank_core.kept_rows). A varlen kernel needs its whole pass, so it keeps the full model.
        self.kept_rows_only = packing and packed_attention is None and kept_rows_supported(backbone)

    def score(self, queries: Sequence[EncodedQuery]) -> BatchScores:
        """``logit_yes - logit_no`` for every document of every query, in input order.

        Each document's score depends only on its own query and text, never on what else shares
        its batch.
        """
        try:
            return self._score(queries)
        finally:
            if self.reuse_memory:
                release_freed_memory()

    @torch.inference_mode()
    def _score(self, queries: Sequence[EncodedQuery]) -> BatchScores:
        rows = [(q, d) for q, query in enumerate(queries) for d in range(len(query.documents))]
        scores = [[0.0] * len(query.documents) for query in queries]
        if not rows:
            return BatchScores(scores, ForwardStats(0, 0, 0, 0))
        if self.packing:
            return self._score_packed(queries, rows, scores)
        passes = tokens = padded = 0
        if self.share_prefix:
            prefixes, passes, padded = self._run_prefixes(queries)
            tokens = sum(len(q.shared) for q in queries)
            lengths = [len(queries[q].documents[d]) for q, d in rows]
        else:
            prefixes = None
            lengths = [len(queries[q].shared) + len(queries[q].documents[d]) for q, d in rows]
        for batch in self._plan(lengths):
            batch_rows = [rows[i] for i in batch]
            probs = self._run_rows(queries, batch_rows, prefixes).tolist()
            for (q, d), p in zip(batch_rows, probs):
                scores[q][d] = p
            passes += 1
            tokens += sum(lengths[i] for i in batch)
            padded += len(batch) * max(lengths[i] for i in batch)
        return BatchScores(scores, ForwardStats(len(rows), passes, tokens, padded))

    def _score_packed(self, queries: Sequence[EncodedQuery], rows, scores) -> BatchScores:
        passes = tokens = 0
        stores: list = []
        # Per pass, its rows and their logits, left on the device: one read at the end of the call
        # rather than a wait for the device after every pass.
        results: list[tuple[list[int], torch.Tensor]] = []
        prefix_of: list[PrefixRef | None] = [None] * len(queries)
        # A prefix pays off from two documents on; a query with one runs as one whole pair, unless
        # scores must not depend on batch-mates: a whole pair rounds differently.
        shared = {
            q
            for q, query in enumerate(queries)
            if self.share_prefix and (len(query.documents) > 1 or self.batch_invariant)
        }
        pieces = [
            queries[q].documents[d] if q in shared else queries[q].shared + queries[q].documents[d] for q, d in rows
        ]
        lengths = [len(piece) for piece in pieces]
        for plan in self._plan_packed(lengths):
            # The prefixes this pass needs that no earlier pass computed, in order of first use.
            needed = list(dict.fromkeys(rows[i][0] for i in plan if rows[i][0] in shared and prefix_of[rows[i][0]] is None))
            prefix_lengths = [len(queries[q].shared) for q in needed]
            # A prefix rides in the pass of its documents where the token budget has room: a pass of
            # a few dozen prefix tokens costs far more per token (every weight is read for them).
            # The varlen kernel reads prefixes from earlier passes only.
            inline = self.packed_attention is None and sum(lengths[i] for i in plan) + sum(prefix_lengths) <= self.max_batch_tokens
            if needed and not inline:
                runs, run_tokens = self._run_prefix_passes(queries, needed, prefix_of, stores)
                passes += runs
                tokens += run_tokens
                needed, prefix_lengths = [], []
            record = None
            if needed:
                # This pass's own prefixes: a store filled layer by layer as the pass runs.
                record = []
                self._place_prefixes(prefix_of, needed, prefix_lengths, len(stores))
                stores.append(record)
            lead = [queries[q].shared for q in needed]
            segments = Segments(
                prefix_lengths + [lengths[i] for i in plan],
                [None] * len(lead) + [prefix_of[rows[i][0]] for i in plan],
                stores,
                record=record,
                record_tokens=sum(prefix_lengths) if needed else None,
            )
            hidden = self._run_packed(lead + [pieces[i] for i in plan], segments, segments.ends()[len(lead) :])
            results.append((plan, self.head(hidden)))
            passes += 1
            tokens += sum(segments.lengths)
        logits = torch.cat([logit for _, logit in results]).cpu().tolist()
        for i, p in zip((i for plan, _ in results for i in plan), logits):
            q, d = rows[i]
            scores[q][d] = p
        return BatchScores(scores, ForwardStats(len(rows), passes, tokens, tokens))

    def _run_prefix_passes(self, queries: Sequence[EncodedQuery], needed: list[int], prefix_of: list, stores: list):
        """Run the prefixes of queries ``needed`` in passes of their own, recording them in ``stores``.

        Returns:
            ``(passes, tokens)`` run.
        """
        lengths = [len(queries[q].shared) for q in needed]
        plans = self._plan_packed(lengths)
        for plan in plans:
            segments = Segments([lengths[i] for i in plan], [None] * len(plan), record=[])
            self._run_packed([queries[needed[i]].shared for i in plan], segments, keep=[])
            self._place_prefixes(prefix_of, [needed[i] for i in plan], [lengths[i] for i in plan], len(stores))
            stores.append(segments.record)
        return len(plans), sum(lengths)

    @staticmethod
    def _place_prefixes(prefix_of: list, queries_: list[int], lengths: list[int], store: int) -> None:
        """Record that the prefixes of ``queries_`` (of ``lengths``) lie one after the other in ``store``."""
        start = 0
        for q, length in zip(queries_, lengths):
            prefix_of[q] = PrefixRef(store, start, length)
            start += length

    def _plan_packed(self, lengths: list[int]) -> list[list[int]]:
        return plan_packed(lengths, self.max_batch_tokens, self.max_batch_pairs)

    def _run_packed(self, pieces: list[list[int]], segments: Segments, keep: list[int]) -> torch.Tensor:
        """Final hidden states ``(len(keep), hidden)`` of rows ``keep`` of one packed row made of ``pieces``.

        Every integer input of the pass (ids, positions, the rows kept, the attention layout) is
        built on the host as arrays and reaches the device in one transfer (:attr:`staging`);
        nothing here waits for the device.
        """
        # np.fromiter over the pieces: 8x faster than torch.tensor of a flattened list.
        ids = np.fromiter(chain.from_iterable(pieces), dtype=np.int64, count=sum(segments.lengths))
        host = [ids, segments.position_array(), np.asarray(keep, dtype=np.int64)]
        layout = self.packed_attention.plan(segments) if self.packed_attention is not None else None
        if layout is not None:
            host += layout.arrays
        ids_t, positions_t, keep_t, *layout_t = self.staging.to_device(host)
        if self.kept_rows_only:
            return forward_kept_rows(self.backbone, ids_t[None], positions_t[None], segments, keep)
        mask = segments if layout is None else self.packed_attention.prepare(segments, layout.on_device(layout_t))
        return self.backbone(
            input_ids=ids_t[None],
            position_ids=positions_t[None],
            # A prepared mapping: transformers passes it to the attention function as it is.
            attention_mask={"full_attention": mask},
            use_cache=False,
        ).last_hidden_state[0, keep_t]

    def _plan(self, lengths: list[int]) -> list[list[int]]:
        return plan_batches(lengths, self.max_batch_tokens, self.max_batch_pairs, self.max_padding)

    def _run_prefixes(self, queries: Sequence[EncodedQuery]) -> tuple[_Prefixes, int, int]:
        lengths = [len(q.shared) for q in queries]
        location: list[tuple[int, int]] = [(0, 0)] * len(queries)
        batches = []
        padded = 0
        for b, batch in enumerate(self._plan(lengths)):
            ids, _ = self._pad([queries[q].shared for q in batch])
            recorder = _PrefixKV()
            # No mask (causal only): with right padding, real tokens never see the padding.
            # Given as a prepared mapping so that transformers builds no mask from the cache.
            self.backbone(
                input_ids=ids,
                attention_mask={"full_attention": None},
                use_cache=False,
                **{self._cache_arg: recorder},
            )
            batches.append(recorder.recorded)
            for row, q in enumerate(batch):
                location[q] = (b, row)
            padded += ids.numel()
        return _Prefixes(lengths, location, batches), len(batches), padded

    def _run_rows(self, queries, batch_rows, prefixes: _Prefixes | None) -> torch.Tensor:
        if prefixes is None:
            ids, lengths = self._pad([queries[q].shared + queries[q].documents[d] for q, d in batch_rows])
            hidden = self.backbone(input_ids=ids, use_cache=False).last_hidden_state
        else:
            ids, lengths = self._pad([queries[q].documents[d] for q, d in batch_rows])
            prefix_lengths = torch.tensor([prefixes.lengths[q] for q, _ in batch_rows], device=self.device)
            past = self._gather_prefixes(prefixes, [q for q, _ in batch_rows])
            steps = torch.arange(ids.shape[1], device=self.device)
            hidden = self.backbone(
                input_ids=ids,
                position_ids=prefix_lengths[:, None] + steps[None, :],
                attention_mask={"full_attention": self._prefix_mask(prefix_lengths, ids.shape[1])},
                use_cache=False,
                **{self._cache_arg: _PrefixKV(past)},
            ).last_hidden_state
        last = hidden[torch.arange(len(batch_rows), device=self.device), lengths - 1]
        return self.head(last).cpu()

    def _pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad id lists into a tensor; returns ``(ids, lengths)``."""
        width = max(len(s) for s in sequences)
        ids = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        lengths = torch.tensor([len(s) for s in sequences])
        return ids.to(self.device), lengths.to(self.device)

    def _gather_prefixes(self, prefixes: _Prefixes, query_of_row: list[int]):
        """Per layer, the prefix keys/values of each row's query, right-padded to a common width.

        One indexed copy per prefix batch and layer (not per row): this runs for every batch.
        """
        width = max(prefixes.lengths[q] for q in query_of_row)
        if len(set(query_of_row)) == 1:
            # One query (the common case): a broadcast view of its row, no copy per row and layer.
            b, row = prefixes.location[query_of_row[0]]
            n = len(query_of_row)
            return [
                (k[row : row + 1, :, :width].expand(n, -1, -1, -1), v[row : row + 1, :, :width].expand(n, -1, -1, -1))
                for k, v in prefixes.batches[b]
            ]
        sources: dict[int, tuple[list[int], list[int]]] = {}
        for position, q in enumerate(query_of_row):
            b, row = prefixes.location[q]
            targets, source_rows = sources.setdefault(b, ([], []))
            targets.append(position)
            source_rows.append(row)
        index = {
            b: (torch.tensor(t, device=self.device), torch.tensor(r, device=self.device))
            for b, (t, r) in sources.items()
        }
        past = []
        for layer in range(len(prefixes.batches[0])):
            pair = []
            for kind in (0, 1):  # keys, values
                sample = prefixes.batches[0][layer][kind]
                out = sample.new_zeros((len(query_of_row), sample.shape[1], width, sample.shape[3]))
                for b, (targets, rows) in index.items():
                    source = prefixes.batches[b][layer][kind][:, :, :width]
                    out[targets, :, : source.shape[2]] = source[rows]
                pair.append(out)
            past.append((pair[0], pair[1]))
        return past

    def _prefix_mask(self, prefix_lengths: torch.Tensor, length: int) -> torch.Tensor:
        """Boolean mask ``(rows, 1, length, prefix_width + length)``: True where attention is allowed.

        Each row sees its own real prefix tokens and, causally, its own document tokens.
        """
        width = int(prefix_lengths.max())
        keys = torch.arange(width, device=self.device)
        see_prefix = (keys[None, :] < prefix_lengths[:, None])[:, None, :].expand(-1, length, -1)
        causal = torch.ones((length, length), dtype=torch.bool, device=self.device).tril()
        see_doc = causal[None].expand(len(prefix_lengths), -1, -1)
        return torch.cat([see_prefix, see_doc], dim=-1)[:, None]

