"""OpenAI-style error bodies ({"error": {"message", "type", "param", "code"}}) for every failure.

Every error is an ordinary response: nothing is re-raised to the server, so a keep-alive connection
stays usable after a 4xx or a 500, and no body carries a traceback, an exception's text or a
store address.
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

log = logging.getLogger("hotswap.api")

RETRY_AFTER_S = "5"
UPLOAD_LIMIT_SCOPE_KEY = "hotswap.max_adapter_bytes"  # set by the guard on upload requests


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


def unavailable(message: str, code: str = "store_unavailable") -> APIError:
    """A 503 the client should retry; `message` is for the caller, so it never names the store."""
    return APIError(503, message, type="service_unavailable", code=code, headers={"Retry-After": RETRY_AFTER_S})


async def api_error_handler(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


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
