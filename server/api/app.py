"""The FastAPI application: OpenAI routes, /health and /metrics around one engine."""
from __future__ import annotations

import hmac
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.errors import APIError, api_error_handler, error_body, validation_error_handler
from server.api.openai.routes import router as openai_router
from server.api.openai.serving import OpenAIServing
from server.engine.async_engine import AsyncEngine
from server.engine.llm_engine import LLMEngine
from server.metrics import Metrics


def build_app(engine: LLMEngine, api_key: str | None = None) -> FastAPI:
    """With `api_key`, every /v1 call must carry `Authorization: Bearer <api_key>`."""
    metrics = Metrics()
    async_engine = AsyncEngine(engine, on_step=metrics.observe_step)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        yield
        async_engine.stop()

    app = FastAPI(title="hotswap", lifespan=lifespan)
    app.state.engine = async_engine
    app.state.metrics = metrics
    app.state.serving = OpenAIServing(async_engine, metrics)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {exc}", "server_error"), status_code=500)

    if api_key:

        @app.middleware("http")
        async def require_key(request: Request, call_next):
            if request.url.path.startswith("/v1/"):
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                    return JSONResponse(error_body("Incorrect API key provided.", "invalid_request_error", code="invalid_api_key"), status_code=401)
            return await call_next(request)

    app.include_router(openai_router)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = async_engine.healthy
        body = {
            "status": "ok" if ok else "engine stopped",
            "model": engine.model_name,
            "dtype": engine.config.dtype,
            "adapters": len(engine.adapters.resident),
            "kernels": {"lora": "torch-sgmv (cpu)"},
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.observe_engine(engine)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
