"""OpenAI-style error bodies ({"error": {"message", "type", "param", "code"}}) for every failure.

Every error is an ordinary response: nothing is re-raised to the server, so a keep-alive connection
stays usable after a 4xx or a 500, and no body carries a traceback, an exception's text or a
store address. The domain errors raised below the HTTP layer (`server.errors`, the registry's
`adapters_store` errors, the engine's `RequestFailed`) get their status here, in one table.
"""
from __future__ import annotations

import contextlib
import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import adapters_store.errors as store_errors
from server import errors
from server.engine.client import RequestFailed

log = logging.getLogger("hotswap.api")

UPLOAD_LIMIT_SCOPE_KEY = "hotswap.max_adapter_bytes"  # set by the guard on upload requests
INVALID, NOT_FOUND, UNAVAILABLE = "invalid_request_error", "not_found_error", "service_unavailable"

# Domain error -> (status, OpenAI error type, code). Subclasses map through their bases.
STATUS_OF: dict[type[Exception], tuple[int, str, str | None]] = {
    errors.ModelNotFound: (404, NOT_FOUND, "model_not_found"),
    errors.InvalidRequest: (400, INVALID, None),
    errors.InvalidAdapter: (400, INVALID, "invalid_adapter"),
    errors.AdapterTooLarge: (400, INVALID, "adapter_too_large"),
    errors.NotPinnable: (400, INVALID, "not_pinnable"),
    errors.NoRoom: (409, INVALID, "no_room"),
    errors.Unavailable: (503, UNAVAILABLE, None),
    errors.StoreUnavailable: (503, UNAVAILABLE, "store_unavailable"),
    errors.AdapterUnavailable: (503, UNAVAILABLE, "adapter_corrupt"),
    # the registry's own errors, as the admin API meets them
    store_errors.InvalidName: (400, INVALID, None),
    store_errors.ManifestError: (400, INVALID, None),
    store_errors.TenantExists: (409, INVALID, "conflict"),
    store_errors.AdapterExists: (409, INVALID, "conflict"),
    store_errors.TenantNotFound: (404, NOT_FOUND, "not_found"),
    store_errors.AdapterNotFound: (404, NOT_FOUND, "not_found"),
    store_errors.KeyNotFound: (404, NOT_FOUND, "not_found"),
    store_errors.StoreUnavailable: (503, UNAVAILABLE, "store_unavailable"),
    store_errors.CorruptObject: (503, UNAVAILABLE, "adapter_corrupt"),
}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: APIError, close: bool = False) -> JSONResponse:
    headers = dict(exc.headers or {})
    if close:
        headers["Connection"] = "close"
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status, headers=headers)


def too_large(limit: int, upload: bool = False) -> APIError:
    if upload:
        return APIError(413, f"the adapter exceeds {limit} bytes (--max-adapter-bytes)", code="adapter_too_large")
    return APIError(413, f"the request body exceeds {limit} bytes (--max-request-bytes)", code="request_too_large")


def to_api_error(exc: Exception, admin: bool = False) -> APIError:
    """The HTTP answer to a domain error. The registry's messages may name the store: only the admin
    sees them; a tenant learns that the registry is unreachable and when to retry."""
    if isinstance(exc, RequestFailed):  # a 503 (the server shutting down) is worth retrying elsewhere or soon
        headers = {"Retry-After": str(errors.RETRY_AFTER_S)} if exc.status == 503 else None
        return APIError(exc.status, str(exc), type="server_error" if exc.status >= 500 else INVALID, code=exc.code, headers=headers)
    status, kind, code = next(STATUS_OF[cls] for cls in type(exc).__mro__ if cls in STATUS_OF)
    message = getattr(exc, "message", str(exc))
    if isinstance(exc, store_errors.RegistryError) and status == 503 and not admin:
        log.warning("adapter store: %s", message)
        message = "the adapter registry is unreachable right now: retry later"
    headers = {"Retry-After": str(getattr(exc, "retry_after", errors.RETRY_AFTER_S))} if status == 503 else None
    return APIError(status, message, type=kind, param=getattr(exc, "param", None), code=getattr(exc, "code", None) or code, headers=headers)


async def api_error_handler(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


async def domain_error_handler(request: Request, exc: Exception) -> JSONResponse:
    return error_response(to_api_error(exc, admin=request.url.path.startswith("/admin/")))


async def validation_error_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    # 400 like OpenAI (FastAPI's default is 422); name the first offending field.
    errors = exc.errors()
    first = errors[0] if errors else {}
    # A union field reports one error per member; the one that got furthest into the value says most.
    first = max((e for e in errors if e.get("loc", ())[:2] == first.get("loc", ())[:2]), key=lambda e: len(e.get("loc", ())), default=first)
    if first.get("type") == "json_invalid":  # loc is ("body", character offset)
        where = first.get("loc", ("body", None))[-1]
        reason = (first.get("ctx") or {}).get("error", "malformed JSON")
        return error_response(APIError(400, f"the body is not valid JSON: {reason} (at character {where})", code="invalid_json"))
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # pydantic names union members in the location ("stop.str"); keep the field path the client wrote
    loc = [p for p in loc if not _is_type_tag(p)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    return error_response(APIError(400, f"{param}: {msg}" if param else msg, param=param))


def _is_type_tag(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "list", "dict", "none") or part.startswith(("list[", "function-", "constrained-"))


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 413:  # Starlette's body limit cut a streamed body off: no point reading the rest
        limit = request.scope.get(UPLOAD_LIMIT_SCOPE_KEY) or request.scope.get(MAX_BODY_SIZE_SCOPE_KEY, 0)
        return error_response(too_large(limit, upload=UPLOAD_LIMIT_SCOPE_KEY in request.scope), close=True)
    if isinstance(exc.__cause__, RecursionError):  # FastAPI's JSON parsing gave up on a deeply nested body
        return error_response(APIError(400, "the body is not valid JSON: it is nested too deeply", code="invalid_json"))
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)


class ErrorBoundary:
    """The last line: an unexpected exception becomes a logged 500 with a plain OpenAI-style body.

    Starlette's own ServerErrorMiddleware re-raises after answering, and uvicorn then drops the
    connection; here nothing is re-raised, so keep-alive clients keep their connection. A response
    that had already started (a stream) is ended cleanly where it was."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error serving %s %s", scope.get("method"), scope.get("path"))
            if not started:
                body = error_body("The server had an error while processing your request.", "server_error", code="internal_error")
                await JSONResponse(body, status_code=500)(scope, receive, send)
                return
            # The client may be gone already; then there is nobody left to tell.
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
