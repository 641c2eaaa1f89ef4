"""The closed set of errors the service answers, each with one status code and a JSON body.

The error body is ``{"error": {"message": str, "type": str, "code": int}}``, except where a
client reads another shape (:func:`error_body`).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .schemas import ErrorResponse, StringErrorResponse


class ServiceError(Exception):
    """An error with an HTTP status; ``message`` is safe to show the caller."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequest(ServiceError):
    status, type = 422, "invalid_request"


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"


class ModelNotFound(ServiceError):
    status, type = 404, "model_not_found"


class PayloadTooLarge(ServiceError):
    status, type = 413, "payload_too_large"


class Overloaded(ServiceError):
    status, type = 503, "overloaded"


class Timeout(ServiceError):
    status, type = 504, "timeout"


# Clients that read `error` as a string (TEI's error body, `{"error": str, "error_type": str}`):
# Elasticsearch's hugging_face service and Weaviate's reranker-transformers module. OpenSearch's
# connectors report a failed call's whole body as text: the short string form reads best there.
STRING_ERROR_PREFIXES = ("/elasticsearch/", "/weaviate/", "/opensearch/")
# Cohere's API answers `{"message": str}`; Weaviate's reranker-cohere module reads only that.
COHERE_PATHS = {"/v1/rerank", "/v2/rerank"}


def route_path(request: Request) -> str:
    """The path below the application's route prefix (``/health`` whatever the prefix)."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def error_body(status: int, type_: str, message: str, path: str = "") -> dict:
    """The error body the client of the route at ``path`` parses.

    Routes under :data:`STRING_ERROR_PREFIXES` answer TEI's ``{"error": message, "error_type": type}``;
    Cohere's routes add a top-level ``message`` to the common body; every other route answers the
    common body.
    """
    if path.startswith(STRING_ERROR_PREFIXES):
        return {"error": message, "error_type": type_}
    body = {"error": {"message": message, "type": type_, "code": status}}
    if path in COHERE_PATHS:
        body["message"] = message
    return body


def error_response(error: ServiceError, path: str = "") -> JSONResponse:
    return JSONResponse(error_body(error.status, error.type, error.message, path), error.status, error.headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        if tuple(err.get("loc", ())) == ("body",) and err.get("type") == "missing":
            parts.append("the body is empty: send a JSON object")
            continue
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


async def handle_service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return error_response(exc, route_path(request))


_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed"}


async def handle_http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette/FastAPI's own errors (unknown route, body not parseable) in the common shape."""
    if exc.status_code == 400:
        # FastAPI answers 400 for bodies it cannot parse at all (invalid UTF-8, nesting too deep):
        # that is an invalid body like any other.
        return error_response(InvalidRequest("the body could not be parsed as JSON"), route_path(request))
    status = exc.status_code
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    body = error_body(status, _HTTP_TYPES.get(status, "http_error"), message, route_path(request))
    return JSONResponse(body, status, exc.headers)


def _is_json(content_type: str | None) -> bool:
    """Whether ``content_type`` is a JSON media type (``application/json``, ``application/*+json``)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _json_decode_error(exc: RequestValidationError, body: bytes) -> str | None:
    """What is wrong with a body FastAPI could not decode as JSON, and where; None if it could."""
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            loc = err.get("loc", ())
            pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
            line = body.count(b"\n", 0, pos) + 1
            column = pos - (body.rfind(b"\n", 0, pos) + 1) + 1
            reason = (err.get("ctx") or {}).get("error", "invalid JSON")
            return f"the body is not valid JSON: {reason} at line {line}, column {column} (char {pos})"
    return None


async def handle_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    path = route_path(request)
    # FastAPI parses a body as JSON only when its content type says so; any other body reaches
    # validation as raw bytes, where "not a valid dictionary" would hide the real mistake.
    if isinstance(exc.body, (bytes, bytearray)) and not _is_json(request.headers.get("content-type")):
        received = request.headers.get("content-type")
        got = f"content-type {received!r}" if received else "no content-type header"
        return error_response(InvalidRequest(
            f"the body was not read as JSON: the request has {got}; send `content-type: application/json`"
        ), path)
    # FastAPI reports a JSON syntax error as `0: JSON decode error`, with the position as its location.
    message = _json_decode_error(exc, await request.body()) or _describe_validation(exc)
    return error_response(InvalidRequest(message), path)


ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        401: "API keys are configured and the bearer token is missing or wrong.",
        404: "The requested model is not configured.",
        413: "Too many documents, characters, body bytes, or (query, window) pairs; or, with TEI's "
        "`truncate: false`, a pair over max_length.",
        422: "Invalid body: not JSON (send content-type: application/json), empty query, no documents, "
        "wrong types (strict: \"2\" is not an integer), unknown fields, top_k < 1, max_chunks_per_doc < 1, "
        "score lists of different lengths, a query too long to leave room for a document, or a chunk "
        "overlap not below this request's document budget.",
        503: "Overloaded (back-pressure) or no replica available; see Retry-After.",
        504: "No answer within the request timeout.",
    }.items()
}
# The same, for the routes under STRING_ERROR_PREFIXES.
STRING_ERROR_RESPONSES = {status: {**doc, "model": StringErrorResponse} for status, doc in ERROR_RESPONSES.items()}
