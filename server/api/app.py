"""The FastAPI application: OpenAI routes, the admin API, /health and /metrics around one engine."""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_store import RegistryError
from server.adapters.service import AdapterService
from server.api.admin.generate import router as generate_router
from server.api.admin.generators import router as generators_router
from server.api.admin.routes import router as admin_router
from server.api.errors import APIError, ErrorBoundary, api_error_handler, domain_error_handler, http_error_handler, validation_error_handler
from server.api.guard import Admission, RequestGuard
from server.api.limits import RequestLimits
from server.api.openai.lora_adapters import router as lora_adapters_router
from server.api.openai.routes import router as openai_router
from server.api.openai.serving import OpenAIServing
from server.auth import is_admin_request
from server.engine.client import EngineClient, LLMEngine, RequestFailed
from server.errors import HotswapError
from server.metrics import Metrics


def build_app(
    engine: LLMEngine | EngineClient,
    api_key: str | None = None,
    adapter_service: AdapterService | None = None,
    limits: RequestLimits | None = None,
    metrics: Metrics | None = None,
    enable_docs: bool = False,
) -> FastAPI:
    """`api_key` is the admin key: with it, /v1 needs the admin or a tenant key, /admin/v1 the admin key,
    and /docs, /openapi.json are off unless `enable_docs`. Without it the server is open (the CLI then
    binds loopback only). `engine` is an LLMEngine, served in this process through an EngineClient, or an
    object with EngineClient's interface already built (the Ray Serve ingress's client of remote engine
    replicas: server.ray_serve)."""
    limits = limits or RequestLimits()
    metrics = metrics or Metrics()
    if adapter_service is not None:
        adapter_service.metrics = metrics  # the service reports to the app that serves it
    client = EngineClient(engine, on_step=metrics.observe_step) if isinstance(engine, LLMEngine) else engine

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client.start()
        yield
        client.stop()

    docs = {} if enable_docs or api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="hotswap", lifespan=lifespan, **docs)
    state = app.state
    state.engine, state.metrics, state.admin_key = client, metrics, api_key
    state.adapter_service = adapter_service
    state.registry = adapter_service.registry if adapter_service else None
    state.limits = limits
    # Set draining on SIGTERM (the CLI's server): /health says so, new API requests are refused, open ones finish.
    state.admission = Admission()
    state.serving = OpenAIServing(client, metrics, limits, adapter_service)
    app.add_exception_handler(APIError, api_error_handler)
    for domain_error in (HotswapError, RegistryError, RequestFailed):  # mapped to HTTP in one table (server.api.errors)
        app.add_exception_handler(domain_error, domain_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    # Outermost last: ErrorBoundary wraps RequestGuard, which runs before any route reads a body.
    app.add_middleware(RequestGuard, admin_key=api_key, registry=state.registry, limits=limits, admission=state.admission)
    app.add_middleware(ErrorBoundary)

    app.include_router(openai_router)
    app.include_router(lora_adapters_router)  # vLLM's /v1/load_lora_adapter, /v1/unload_lora_adapter (admin key)
    app.include_router(admin_router)
    app.include_router(generate_router)
    app.include_router(generators_router)

    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", prometheus, methods=["GET"])
    return app


# Module-level, not closures in build_app: FastAPI caches endpoint callables process-wide (an LRU of
# 4,096 in fastapi.dependencies.models), so a closure would keep its app's engine alive after the app
# is gone; reading the app's state per request keeps nothing.
async def health(request: Request) -> JSONResponse:
    """Public: only whether the server is ready. With the admin key: what it runs on."""
    state = request.app.state
    if state.admission.draining:
        status = "draining"
    else:
        status = "ready" if state.engine.healthy else "stopped"
    body: dict = {"status": status}
    if is_admin_request(request, state.admin_key):
        service = state.adapter_service
        body |= state.engine.describe() | {"registry": service.registry.store.description if service else None}
    return JSONResponse(body, status_code=200 if status == "ready" else 503)


async def prometheus(request: Request) -> Response:
    state = request.app.state
    state.engine.observe(state.metrics)
    if state.adapter_service is not None:
        state.metrics.observe_tiers(state.adapter_service)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
