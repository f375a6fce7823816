"""Limits before work: who is calling and how large the body may be are settled from the headers alone,
before a byte of the body is read, parsed or tokenized.

- `/v1/...`: the caller's principal (admin, a tenant by its key, or anyone in open mode) is put in
  `request.state.principal`; a wrong key is a 401 at once.
- `/admin/...`: the admin key, or a 401 at once.
- Every body is capped: a declared Content-Length over the cap is a 413 at once, and a body streamed
  without one (chunked) is cut off with a 413 as soon as it passes the cap, so nothing ever buffers or
  spools more than the cap. Uploads have their own, larger cap.
- While the server drains (after SIGTERM) every new `/v1/...` and `/admin/...` request is a 503 with
  `Retry-After` at once; `/health` and `/metrics` still answer. Admitted requests are counted while
  they run, so that the drain knows when the last one has finished (`Admission`).
"""
from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from adapters_store import Registry
from server.api.errors import UPLOAD_LIMIT_SCOPE_KEY, APIError, error_response, to_api_error, too_large
from server.api.limits import RequestLimits
from server.errors import RETRY_AFTER_S, HotswapError
from server.auth import api_principal, require_admin

# multipart framing and form fields around an uploaded adapter's bytes
UPLOAD_SLACK_BYTES = 64 * 1024
UPLOAD_PATH = "/admin/v1/adapters"
# What a request refused, or ended, by a shutdown is told (the engine's RequestFailed says the same).
SHUTTING_DOWN_MESSAGE = "the server is shutting down: retry"
SHUTTING_DOWN = "server_shutting_down"  # its error code


class Admission:
    """Whether API requests are admitted, and how many admitted ones are still being answered.

    `draining` is set on SIGTERM (server.cli); from then on new API requests are refused, and the drain
    waits for `in_flight` to reach 0. Both are only touched on the event loop (and the flag by a signal
    handler, which runs there too)."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0  # /v1 and /admin requests admitted and not yet answered in full (streams included)


def shutting_down() -> APIError:
    # The connection is closed after the answer, so that a keep-alive client's retry finds another replica.
    return APIError(503, SHUTTING_DOWN_MESSAGE, type="service_unavailable", code=SHUTTING_DOWN, headers={"Retry-After": str(RETRY_AFTER_S)})


class RequestGuard:
    def __init__(self, app: ASGIApp, admin_key: str | None, registry: Registry | None, limits: RequestLimits,
                 admission: Admission | None = None):
        self.app, self.admin_key, self.registry, self.limits = app, admin_key, registry, limits
        self.admission = admission or Admission()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        api = path in ("/v1", "/admin") or path.startswith(("/v1/", "/admin/"))
        if not api:  # /health, /metrics: never refused, not counted
            await self._check(scope, receive, send, path)
            return
        if self.admission.draining:
            await error_response(shutting_down(), close=True)(scope, receive, send)
            return
        self.admission.in_flight += 1
        try:
            await self._check(scope, receive, send, path)
        finally:
            self.admission.in_flight -= 1

    async def _check(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        request = Request(scope)  # headers only: the body is not touched here
        upload = scope["method"] == "POST" and path == UPLOAD_PATH
        if upload:
            scope[UPLOAD_LIMIT_SCOPE_KEY] = self.limits.max_adapter_bytes  # for the 413's message
        limit = self.limits.max_adapter_bytes + UPLOAD_SLACK_BYTES if upload else self.limits.max_request_bytes
        try:
            if path == "/v1" or path.startswith("/v1/"):
                request.state.principal = await api_principal(request, self.admin_key, self.registry)
            elif path == "/admin" or path.startswith("/admin/"):
                require_admin(request, self.admin_key)
                request.state.admin_checked = True  # the admin routes refuse to run without this mark
            declared = _content_length(request.headers)
            if declared is not None and declared > limit:
                raise too_large(self.limits.max_adapter_bytes if upload else limit, upload)
        except (APIError, HotswapError) as e:
            error = e if isinstance(e, APIError) else to_api_error(e)
            await error_response(error, close=_unread_body_is_large(request.headers, limit))(scope, receive, send)
            return
        await RequestBodyLimitMiddleware(self.app, limit)(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path the router matches: without the prefix the app is mounted under (root_path)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def _unread_body_is_large(headers: Headers, limit: int) -> bool:
    """Answering before reading the body leaves the server to drain it for keep-alive; a body of unknown
    or excessive length is not worth draining, so the connection is closed after the answer instead."""
    declared = _content_length(headers)
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    return chunked or (declared is not None and declared > limit)
