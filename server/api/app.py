"""The FastAPI application: OpenAI routes, the admin API, /health and /metrics around one engine."""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.adapters.service import AdapterService
from server.api.admin.generate import router as generate_router
from server.api.admin.routes import router as admin_router
from server.api.errors import APIError, api_error_handler, error_body, validation_error_handler
from server.api.openai.routes import router as openai_router
from server.api.openai.serving import OpenAIServing
from server.engine.async_engine import AsyncEngine
from server.engine.llm_engine import LLMEngine
from server.metrics import Metrics

DEFAULT_MAX_ADAPTER_BYTES = 512 * 2**20


def build_app(
    engine: LLMEngine,
    api_key: str | None = None,
    adapter_service: AdapterService | None = None,
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
    metrics: Metrics | None = None,
) -> FastAPI:
    """`api_key` is the admin key: with it, /v1 needs the admin or a tenant key, /admin/v1 the admin key.
    Without it the server is open (the CLI then binds loopback only)."""
    metrics = metrics or Metrics()
    if adapter_service is not None:
        adapter_service.metrics = metrics  # the service reports to the app that serves it
    async_engine = AsyncEngine(engine, on_step=metrics.observe_step)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        yield
        async_engine.stop()

    app = FastAPI(title="hotswap", lifespan=lifespan)
    state = app.state
    state.engine, state.metrics, state.admin_key = async_engine, metrics, api_key
    state.adapter_service = adapter_service
    state.registry = adapter_service.registry if adapter_service else None
    state.max_adapter_bytes = max_adapter_bytes
    state.serving = OpenAIServing(async_engine, metrics, adapter_service)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {exc}", "server_error"), status_code=500)

    app.include_router(openai_router)
    app.include_router(admin_router)
    app.include_router(generate_router)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = async_engine.healthy
        body = {
            "status": "ok" if ok else "engine stopped",
            "model": engine.model_name,
            "dtype": engine.config.dtype,
            "adapters_resident": len(engine.adapters.resident),
            "registry": adapter_service.registry.store.description if adapter_service else None,
            "quantization": engine.quantization,
            "kernels": engine.kernels,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.observe_engine(engine)
        if adapter_service is not None:
            metrics.observe_tiers(adapter_service)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
