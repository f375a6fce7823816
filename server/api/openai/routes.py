"""Routes of the OpenAI-compatible API."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.api.openai.protocol import ChatCompletionRequest, CompletionRequest, ModelList

router = APIRouter(prefix="/v1")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _respond(result):
    if isinstance(result, dict):
        return result
    return StreamingResponse(result, media_type="text/event-stream", headers=_SSE_HEADERS)


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return await request.app.state.serving.list_models(request)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    return _respond(await request.app.state.serving.completions(body, request))


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return _respond(await request.app.state.serving.chat(body, request))
