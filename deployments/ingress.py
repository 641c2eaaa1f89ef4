"""The HTTP ingress: validates, tokenizes, fans chunks out to model replicas, merges the ranking.

CPU work (validation, tokenization, merging) stays here so that model replicas only run forward
passes. Only plain data (:class:`~rerank_core.prompt.EncodedQuery`) crosses to the replicas.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
import uuid
from dataclasses import dataclass

import ray
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from rerank_core import QueryTooLongError, load_encoder, rank_indices

from . import schemas
from .args import AppArgs
from .errors import (
    ERROR_RESPONSES,
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
)
from .metrics import IngressMetrics

logger = logging.getLogger("ray.serve")

OPEN_PATHS = {"/health"}
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
    try:
        if _route_path(request) not in OPEN_PATHS:
            _authorize(request, getattr(state, "api_keys", ()))
        declared = request.headers.get("content-length")
        limit = getattr(state, "max_body_bytes", None)
        if limit is not None and declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
        response = await call_next(request)
    except ServiceError as e:
        response = error_response(e)
    metrics = getattr(state, "metrics", None)
    if metrics is not None:
        metrics.observe(_route_path(request), response.status_code, 1000 * (time.perf_counter() - started))
    return response


def _route_path(request: Request) -> str:
    """The path below the application's route prefix (``/health`` whatever the prefix)."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


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


@dataclass
class Ranking:
    """Outcome of one rerank call, before it is shaped for a route."""

    id: str
    model: str
    scores: list[float]
    order: list[int]
    tokens: int


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class RerankIngress:
    """Front door of the application. Serve builds it from :class:`AppArgs` and model handles."""

    def __init__(self, args: AppArgs, *model_handles):
        self.args = args
        self.handles = {m.name: h for m, h in zip(args.models, model_handles)}
        self.encoders = {
            m.name: load_encoder(m.source, m.max_length, hub=m.hub, cache_dir=m.cache_dir) for m in args.models
        }
        self.names = {alias: m.name for m in args.models for alias in (m.name, *m.aliases)}
        app.state.api_keys = _api_keys(args)
        app.state.max_body_bytes = args.max_body_bytes
        app.state.metrics = IngressMetrics()
        self.in_flight = 0
        self.chunk_retries = 0

    # Routes -------------------------------------------------------------------------------

    @app.post("/rerank", response_model=schemas.RerankResponse, response_model_exclude_none=True,
              responses=ERROR_RESPONSES, summary="Rerank documents")
    async def rerank(self, body: schemas.RerankRequest) -> schemas.RerankResponse:
        """Rank ``documents`` by relevance to ``query``; highest score first, ties by lower index."""
        docs = body.documents
        r = await self._rank(body.model, body.query, docs, body.instruction, body.top_k)
        return schemas.RerankResponse(
            id=r.id,
            model=r.model,
            results=[
                schemas.RerankResult(index=i, relevance_score=r.scores[i],
                                     document=docs[i] if body.return_documents else None)
                for i in r.order
            ],
            usage=schemas.Usage(prompt_tokens=r.tokens, total_tokens=r.tokens),
        )

    @app.post("/v1/rerank", response_model=schemas.JinaRerankResponse, response_model_exclude_none=True,
              responses=ERROR_RESPONSES, summary="Rerank documents (Jina / vLLM shape)")
    async def rerank_v1(self, body: schemas.JinaRerankRequest) -> schemas.JinaRerankResponse:
        """Jina / vLLM compatible: ``top_n`` 0 or absent returns all; documents returned by default."""
        docs = body.texts()
        r = await self._rank(body.model, body.query, docs, body.instruction, body.top_n or None)
        return schemas.JinaRerankResponse(
            id=r.id,
            model=r.model,
            usage=schemas.Usage(prompt_tokens=r.tokens, total_tokens=r.tokens),
            results=[
                schemas.JinaResult(
                    index=i,
                    relevance_score=r.scores[i],
                    document=schemas.TextDocument(text=docs[i]) if body.return_documents else None,
                )
                for i in r.order
            ],
        )

    @app.post("/v2/rerank", response_model=schemas.CohereRerankResponse, responses=ERROR_RESPONSES,
              summary="Rerank documents (Cohere v2 shape)")
    async def rerank_v2(self, body: schemas.CohereRerankRequest) -> schemas.CohereRerankResponse:
        """Cohere v2 compatible, for the official SDK (``cohere.ClientV2(base_url=...)``)."""
        r = await self._rank(body.model, body.query, body.documents, None, body.top_n, body.max_tokens_per_doc)
        warnings = [
            f"{field} is accepted but has no effect on this server"
            for field in ("priority", "relevant_spans")
            if getattr(body, field) is not None
        ]
        return schemas.CohereRerankResponse(
            id=r.id,
            results=[schemas.CohereResult(index=i, relevance_score=r.scores[i]) for i in r.order],
            meta=schemas.CohereMeta(
                billed_units=schemas.CohereBilledUnits(search_units=1),
                tokens=schemas.CohereTokens(input_tokens=r.tokens),
                warnings=warnings,
            ),
        )

    @app.get("/v1/models", response_model=schemas.ModelList, responses=ERROR_RESPONSES, summary="Served models")
    async def models(self) -> schemas.ModelList:
        return schemas.ModelList(
            data=[schemas.ModelCard(id=m.name, aliases=m.aliases, max_length=m.max_length) for m in self.args.models]
        )

    @app.get("/health", summary="200 when every model has a live replica, else 503",
             responses={503: ERROR_RESPONSES[503]})
    async def health(self) -> dict:
        try:
            await asyncio.wait_for(asyncio.gather(*(h.ping.remote() for h in self.handles.values())), 5.0)
        except (asyncio.TimeoutError, RayActorError, BackPressureError) as e:
            raise self._overloaded(f"not every model has a live replica ({type(e).__name__})") from e
        return {"status": "ok", "models": list(self.handles)}

    def stats(self) -> dict:
        """Counters of this ingress replica (for tests and debugging; not an HTTP route)."""
        return {
            "in_flight": self.in_flight,
            "chunk_retries": self.chunk_retries,
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    # Work ---------------------------------------------------------------------------------

    async def _rank(self, model, query, documents, instruction, top_k, max_document_tokens=None) -> Ranking:
        name = self._model_name(model)
        self._check_limits(query, documents)
        # Admission control per request, not per chunk: shedding some chunks of a request would
        # waste the work done on the others.
        if self.in_flight >= self.args.max_concurrent_requests:
            raise self._overloaded(f"{self.in_flight} requests in progress; retry later")
        self.in_flight += 1
        try:
            return await self._rank_admitted(name, query, documents, instruction, top_k, max_document_tokens)
        finally:
            self.in_flight -= 1

    def _overloaded(self, message: str) -> Overloaded:
        return Overloaded(message, {"Retry-After": str(self.args.retry_after_s)})

    async def _rank_admitted(self, name, query, documents, instruction, top_k, max_document_tokens) -> Ranking:
        encoder = self.encoders[name]
        try:
            # Tokenizing thousands of documents is CPU work: keep the event loop free meanwhile.
            encoded = await asyncio.to_thread(encoder.encode, query, documents, instruction, max_document_tokens)
        except QueryTooLongError as e:
            raise InvalidRequest(str(e)) from e
        chunks = encoded.split(self.args.chunk_tokens, self.args.chunk_pairs)
        chunk_scores = await self._score_chunks(name, [chunk for _, chunk in chunks])
        scores = [0.0] * len(documents)
        for (indices, _), values in zip(chunks, chunk_scores):
            for i, value in zip(indices, values):
                scores[i] = value
        return Ranking(f"rerank-{uuid.uuid4().hex}", name, scores, rank_indices(scores, top_k), encoded.num_tokens())

    def _model_name(self, model: str | None) -> str:
        if model is None:
            return self.names[self.args.default_model_name()]
        if model not in self.names:
            raise ModelNotFound(f"model {model!r} is not served here; see GET /v1/models")
        return self.names[model]

    def _check_limits(self, query: str, documents: list[str]) -> None:
        if len(documents) > self.args.max_documents:
            raise PayloadTooLarge(f"{len(documents)} documents; the limit is {self.args.max_documents}")
        chars = len(query) + sum(len(d) for d in documents)
        if chars > self.args.max_request_chars:
            raise PayloadTooLarge(f"{chars} characters of query and documents; the limit is {self.args.max_request_chars}")

    async def _score_chunks(self, name: str, chunks) -> list[list[float]]:
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
