"""The HTTP ingress: validates, tokenizes, fans chunks out to model replicas, merges the results.

CPU work (validation, tokenization, windowing, merging) stays here so that model replicas only
run forward passes. Only plain data (:class:`~rerank_core.prompt.EncodedQuery`) crosses to the
replicas, and only logits come back. Each API shape is an adapter (:mod:`deployments.adapters`)
around one internal request (:class:`~deployments.adapters.Job`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time

import ray
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from ray import serve
from ray.exceptions import RayActorError, RayError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from rerank_core import WindowedQuery, group_by_query, load_encoder, probabilities

from . import adapters, schemas
from .args import AppArgs
from .errors import (
    ERROR_RESPONSES,
    STRING_ERROR_RESPONSES,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Timeout,
    Unauthorized,
    error_response,
    handle_http_exception,
    handle_service_error,
    handle_validation_error,
    route_path,
)
from .metrics import IngressMetrics
from .scale_to_zero import may_scale_to_zero, scaled_to_zero

logger = logging.getLogger("ray.serve")

# Weaviate's reranker-transformers module sends no credentials, not even to its readiness probe.
OPEN_PATHS = {"/health", "/weaviate/.well-known/ready"}
# A chunk whose model replica dies is sent up to this many times in all, waiting 0.25 s, then
# 0.5 s, ... between attempts; all within request_timeout_s.
CHUNK_ATTEMPTS = 3
CHUNK_RETRY_BACKOFF_S = 0.25

# FastAPIOffline: a FastAPI app whose /docs and /redoc pages load Swagger UI and ReDoc from the
# service itself (assets shipped in the fastapi-offline package), not from a CDN.
app = FastAPIOffline(
    title="Qwen3-Reranker",
    description="Rerank documents by relevance to a query with Qwen3-Reranker models.",
    version="0.1.0",
)
app.add_exception_handler(ServiceError, handle_service_error)
app.add_exception_handler(RequestValidationError, handle_validation_error)
app.add_exception_handler(HTTPException, handle_http_exception)


@app.middleware("http")
async def guard(request: Request, call_next):
    """Authenticate, cap body size, and time every request (settings in ``app.state``)."""
    started = time.perf_counter()
    state = request.app.state
    path = route_path(request)
    try:
        if path not in OPEN_PATHS:
            _authorize(request, getattr(state, "api_keys", ()))
        declared = request.headers.get("content-length")
        limit = getattr(state, "max_body_bytes", None)
        if limit is not None and declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
        response = await call_next(request)
    except ServiceError as e:
        response = error_response(e, path)
    metrics = getattr(state, "metrics", None)
    if metrics is not None:
        metrics.observe(path, response.status_code, 1000 * (time.perf_counter() - started))
    return response


def _authorize(request: Request, keys) -> None:
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest against every key: time does not reveal which key or prefix matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token.encode(), key.encode())
    if scheme.lower() != "bearer" or not matched:
        raise Unauthorized("missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})


def _api_keys(args: AppArgs) -> tuple[str, ...]:
    """Configured keys plus those in the environment variable ``args.api_keys_env``."""
    keys = list(args.api_keys)
    if args.api_keys_env:
        keys += [k.strip() for k in os.environ.get(args.api_keys_env, "").split(",") if k.strip()]
    return tuple(keys)


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class RerankIngress:
    """Front door of the application. Serve builds it from :class:`AppArgs` and model handles."""

    def __init__(self, args: AppArgs, *model_handles):
        self.args = args
        self.handles = {m.name: h for m, h in zip(args.models, model_handles)}
        self.models = {m.name: m for m in args.models}
        self.encoders = {
            m.name: load_encoder(m.source, m.max_length, hub=m.hub, cache_dir=m.cache_dir) for m in args.models
        }
        self.names = {alias: m.name for m in args.models for alias in (m.name, *m.aliases)}
        app.state.api_keys = _api_keys(args)
        app.state.max_body_bytes = args.max_body_bytes
        app.state.metrics = IngressMetrics()
        self.in_flight = 0
        self.chunk_retries = 0
        self.app_name = serve.get_replica_context().app_name
        # Models that /health must not call when they have no replica: a call would start one.
        self.may_rest = {m.name: self.handles[m.name].deployment_name for m in args.models if may_scale_to_zero(m)}

    # Routes: each turns its body into a Job with its adapter and shapes the result back ------

    @app.post("/rerank", response_model=schemas.RerankAnswer, response_model_exclude_none=True,
              responses=ERROR_RESPONSES, summary="Rerank documents (this project's shape, or TEI's)")
    async def rerank(self, body: schemas.RerankBody) -> schemas.RerankAnswer:
        """Rank ``documents`` by relevance to ``query``; highest score first, ties by lower index.

        A body with ``texts`` instead of ``documents`` is Text Embeddings Inference's request and
        gets TEI's answer: a list ``[{index, score, text?}]``, best first.
        """
        if isinstance(body, schemas.TeiRerankRequest):
            return adapters.tei_response(body, await self._score(adapters.tei_job(body)))
        return adapters.rerank_response(body, await self._score(adapters.rerank_job(body)))

    @app.post("/v1/rerank", response_model=schemas.JinaRerankResponse, response_model_exclude_none=True,
              responses=ERROR_RESPONSES, summary="Rerank documents (Jina / vLLM shape)")
    async def rerank_v1(self, body: schemas.JinaRerankRequest) -> schemas.JinaRerankResponse:
        """Jina / vLLM compatible, and Cohere v1 (``cohere.Client``): ``top_n`` 0 or absent returns all;
        documents returned by default."""
        return adapters.jina_response(body, await self._score(adapters.jina_job(body)))

    @app.post("/v2/rerank", response_model=schemas.CohereRerankResponse, response_model_exclude_none=True,
              responses=ERROR_RESPONSES, summary="Rerank documents (Cohere v2 shape)")
    async def rerank_v2(self, body: schemas.CohereRerankRequest) -> schemas.CohereRerankResponse:
        """Cohere v2 compatible, for the official SDK (``cohere.ClientV2(base_url=...)``)."""
        return adapters.cohere_response(body, await self._score(adapters.cohere_job(body)))

    @app.post("/elasticsearch/rerank", response_model=list[schemas.TeiRank], response_model_exclude_none=True,
              responses=STRING_ERROR_RESPONSES, summary="Rerank documents (Elasticsearch's hugging_face service)")
    async def rerank_elasticsearch(self, body: schemas.ElasticBody) -> list[schemas.TeiRank]:
        """Both bodies Elasticsearch versions post (``texts`` as TEI, or ``documents``); a bare array answers."""
        if isinstance(body, schemas.TeiRerankRequest):
            return adapters.tei_response(body, await self._score(adapters.tei_job(body)))
        return adapters.elastic_response(body, await self._score(adapters.elastic_job(body)))

    @app.post("/weaviate/rerank", response_model=schemas.WeaviateRerankResponse, responses=STRING_ERROR_RESPONSES,
              summary="Rerank documents (Weaviate's reranker-transformers container)")
    async def rerank_weaviate(self, body: schemas.WeaviateRerankRequest) -> schemas.WeaviateRerankResponse:
        """``{query, documents}`` answered by ``{query, scores: [{document, score}]}`` in input order."""
        return adapters.weaviate_response(body, await self._score(adapters.weaviate_job(body)))

    @app.get("/weaviate/meta", response_model=schemas.ModelList, responses=STRING_ERROR_RESPONSES,
             summary="Weaviate's module meta (shown in its /v1/meta): the served models")
    async def weaviate_meta(self) -> schemas.ModelList:
        return self._model_list()

    @app.get("/weaviate/.well-known/ready", status_code=204, responses={503: STRING_ERROR_RESPONSES[503]},
             summary="Weaviate's readiness probe: 204 when /health is 200")
    async def weaviate_ready(self) -> None:
        await self.health()

    @app.post("/opensearch/rerank", response_model=list[schemas.OpenSearchResult], responses=STRING_ERROR_RESPONSES,
              summary="Rerank documents (OpenSearch ml-commons connector, post-process default.rerank)")
    async def rerank_opensearch(self, body: schemas.OpenSearchRerankRequest) -> list[schemas.OpenSearchResult]:
        """``{query, documents, top_n?, model?}`` answered by ``[{index, relevance_score}]``, best first."""
        return adapters.opensearch_response(body, await self._score(adapters.opensearch_job(body)))

    @app.post("/score", response_model=schemas.ScoreResponse, responses=ERROR_RESPONSES,
              summary="Score (query, document) pairs (vLLM score shape)")
    @app.post("/v1/score", response_model=schemas.ScoreResponse, responses=ERROR_RESPONSES,
              summary="Score (query, document) pairs (vLLM score shape, older path)")
    async def score(self, body: schemas.ScoreRequest) -> schemas.ScoreResponse:
        """vLLM compatible: one query and N documents (1:N), or N (query, document) pairs (N:N).

        Scores come in input order. Pairs are grouped by query, so each distinct query's shared
        part runs once, and all groups are scored in the same forward passes.
        """
        return adapters.score_response(body, await self._score(adapters.score_job(body)))

    @app.get("/v1/models", response_model=schemas.ModelList, responses=ERROR_RESPONSES, summary="Served models")
    async def models(self) -> schemas.ModelList:
        return self._model_list()

    def _model_list(self) -> schemas.ModelList:
        # Not `self.models()` from another route: the instance's `models` dict shadows that method.
        return schemas.ModelList(
            data=[schemas.ModelCard(id=m.name, aliases=m.aliases, max_length=m.max_length) for m in self.args.models]
        )

    @app.get("/health", summary="200 when every model has a live replica or is scaled to zero, else 503",
             responses={503: ERROR_RESPONSES[503]})
    async def health(self) -> dict:
        """Pings every model's replicas, except models autoscaling has scaled to zero (listed in
        ``scaled_to_zero``): they are healthy by design and a ping would wake them."""
        resting = await self._scaled_to_zero()
        live = [h for name, h in self.handles.items() if name not in resting]
        try:
            await asyncio.wait_for(asyncio.gather(*(h.ping.remote() for h in live)), 5.0)
        except (asyncio.TimeoutError, RayActorError, BackPressureError) as e:
            raise self._overloaded(f"not every model has a live replica ({type(e).__name__})") from e
        return {"status": "ok", "models": list(self.handles), "scaled_to_zero": sorted(resting)}

    async def _scaled_to_zero(self) -> set[str]:
        if not self.may_rest:
            return set()
        try:
            return await asyncio.wait_for(asyncio.to_thread(scaled_to_zero, self.app_name, self.may_rest), 5.0)
        except (asyncio.TimeoutError, RayError) as e:
            # Without the controller's view, ping them all: a cold start beats a false "healthy".
            logger.warning("Serve status unavailable for /health (%s); pinging every model", type(e).__name__)
            return set()

    def stats(self) -> dict:
        """Counters of this ingress replica (for tests and debugging; not an HTTP route)."""
        return {
            "in_flight": self.in_flight,
            "chunk_retries": self.chunk_retries,
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    # Work ---------------------------------------------------------------------------------

    async def _score(self, job: adapters.Job) -> adapters.Scored:
        name = self._model_name(job.model)
        self._check_limits(job)
        # Admission control per request, not per chunk: shedding some chunks of a request would
        # waste the work done on the others.
        if self.in_flight >= self.args.max_concurrent_requests:
            raise self._overloaded(f"{self.in_flight} requests in progress; retry later")
        self.in_flight += 1
        try:
            return await self._score_admitted(name, job)
        finally:
            self.in_flight -= 1

    def _overloaded(self, message: str) -> Overloaded:
        return Overloaded(message, {"Retry-After": str(self.args.retry_after_s)})

    async def _score_admitted(self, name: str, job: adapters.Job) -> adapters.Scored:
        groups = group_by_query(job.queries)
        # Tokenizing thousands of documents is CPU work: keep the event loop free meanwhile.
        windowed = await asyncio.to_thread(self._encode, name, job, groups)
        self._check_windows(job, groups, windowed)
        # Every group's chunks go out at once: replicas batch them together (shared passes).
        pieces = [(g, indices, chunk) for g, w in enumerate(windowed)
                  for indices, chunk in w.encoded.split(self.args.chunk_tokens, self.args.chunk_pairs)]
        chunk_logits = await self._score_chunks(name, [chunk for _, _, chunk in pieces])
        row_logits = [[0.0] * w.num_windows for w in windowed]
        for (g, indices, _), values in zip(pieces, chunk_logits):
            for i, value in zip(indices, values):
                row_logits[g][i] = value
        logits = [0.0] * len(job.documents)
        spans = [(0, 0)] * len(job.documents) if job.return_spans else None
        for group, w, rows in zip(groups, windowed, row_logits):
            # A document's windows may have run in different chunks and replicas: the best wins.
            best = w.best(rows)
            for j, i in enumerate(group):
                logits[i] = best.logits[j]
                if spans is not None:
                    spans[i] = best.spans[j]
        tokens = sum(w.encoded.num_tokens() for w in windowed)
        return adapters.Scored(name, logits, probabilities(logits), spans, tokens)

    def _encode(self, name: str, job: adapters.Job, groups: list[list[int]]) -> list[WindowedQuery]:
        model = self.models[name]
        try:
            return [
                self.encoders[name].encode_windows(
                    job.queries[group[0]], [job.documents[i] for i in group], job.instruction,
                    max_document_tokens=job.max_tokens_per_doc,
                    max_windows=job.max_chunks_per_doc or model.max_chunks_per_doc,
                    overlap=model.chunk_overlap_tokens,
                    truncation_side=job.truncation_side,
                    max_pair_tokens=job.max_pair_tokens,
                    spans=job.return_spans,
                )
                for group in groups
            ]
        except ValueError as e:  # a query too long for any document, or an overlap too wide for it
            raise InvalidRequest(str(e)) from e

    def _check_windows(self, job: adapters.Job, groups, windowed: list[WindowedQuery]) -> None:
        """Limits known only once documents are tokenized; nothing has been scored yet."""
        windows = sum(w.num_windows for w in windowed)
        if windows > self.args.max_pairs:
            raise PayloadTooLarge(
                f"{len(job.documents)} documents make {windows} (query, window) pairs; the limit is "
                f"max_pairs={self.args.max_pairs}"
            )
        if not job.truncate:
            cut = sorted(group[w.document_of[row]] for group, w in zip(groups, windowed)
                         for row, truncated in enumerate(w.encoded.truncated) if truncated)
            if cut:
                raise PayloadTooLarge(
                    f"documents {sorted(set(cut))[:10]} do not fit the model's max_length with the query "
                    f"and prompt template, and truncate is false"
                )

    def _model_name(self, model: str | None) -> str:
        if model is None:
            return self.names[self.args.default_model_name()]
        if model not in self.names:
            raise ModelNotFound(f"model {model!r} is not served here; see GET /v1/models")
        return self.names[model]

    def _check_limits(self, job: adapters.Job) -> None:
        if len(job.documents) > self.args.max_documents:
            raise PayloadTooLarge(f"{len(job.documents)} documents; the limit is {self.args.max_documents}")
        chars = sum(len(q) for q in set(job.queries)) + sum(len(d) for d in job.documents)
        if chars > self.args.max_request_chars:
            raise PayloadTooLarge(f"{chars} characters of query and documents; the limit is {self.args.max_request_chars}")

    async def _score_chunks(self, name: str, chunks) -> list[list[float]]:
        """Logits of every chunk's rows, in order."""
        handle = self.handles[name]
        calls = [asyncio.ensure_future(self._score_chunk(handle, chunk)) for chunk in chunks]
        try:
            return await asyncio.wait_for(asyncio.gather(*calls), self.args.request_timeout_s)
        except asyncio.TimeoutError as e:
            raise Timeout(f"model {name!r} did not answer within {self.args.request_timeout_s} s") from e
        except BackPressureError as e:
            raise self._overloaded(f"model {name!r} is overloaded; retry later") from e
        except RayActorError as e:
            raise self._overloaded(
                f"model {name!r} lost a replica on each of {CHUNK_ATTEMPTS} attempts; retry later"
            ) from e
        finally:
            for call in calls:
                call.cancel()

    async def _score_chunk(self, handle, chunk) -> list[float]:
        for attempt in range(1, CHUNK_ATTEMPTS):
            try:
                return await handle.score.remote(chunk)
            except RayActorError:
                # Scoring is idempotent: a chunk whose replica died is sent again. The router stops
                # picking a replica once it sees it dead; until a lost node's death is detected
                # (seconds) it may pick it again, hence a few attempts with a short backoff.
                logger.warning("a model replica died during a chunk; retrying it (attempt %d)", attempt + 1)
                self.chunk_retries += 1
                app.state.metrics.retries.inc()
                await asyncio.sleep(CHUNK_RETRY_BACKOFF_S * 2 ** (attempt - 1))
        return await handle.score.remote(chunk)  # the last attempt: its RayActorError propagates
