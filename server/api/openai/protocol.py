"""Request and response shapes of the OpenAI API (the parts hotswap serves), validated strictly (server.validation)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

from adapters_store.user_state import MAX_USER_CHARS
from server.adapters.stacking import MAX_ABS_WEIGHT, MAX_MEMBERS
from server.validation import StrictModel, Text
from server.engine.client import MIN_TEMPERATURE

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_SEQUENCES, MAX_STOP_CHARS = 16, 1024
MAX_STOP_TOKEN_IDS = 256
MAX_MESSAGES = 4096  # bounds the work of validating and rendering one conversation


def _temperature(value: float) -> float:
    if 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return value


StopText = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class StreamOptions(StrictModel):
    include_usage: bool = False


class AdapterMember(StrictModel):
    """One adapter of a multi-adapter request (server.api.openai.merging), with its weight in the linear merge."""

    model: Annotated[Text, Field(min_length=1, max_length=512)]
    weight: Annotated[float, Field(ge=-MAX_ABS_WEIGHT, le=MAX_ABS_WEIGHT)] = 1.0


class SamplingFields(StrictModel):
    model: Annotated[Text, Field(min_length=1, max_length=512)]
    max_tokens: int | None = Field(None, ge=1)
    temperature: Annotated[float, Field(ge=0.0, le=2.0), AfterValidator(_temperature)] = 1.0
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=2**31 - 1)  # extension (vLLM): 0 or -1 disables
    n: int = Field(1, ge=1)  # the server's --max-n is checked when the request is served
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None  # extension (vLLM)
    ignore_eos: bool = False  # extension (vLLM)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    user: Annotated[Text, Field(max_length=MAX_USER_CHARS)] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logprobs: bool | Annotated[int, Field(ge=0, le=20)] | None = None
    # extension (LoRAX-style merged adapters): `model` is then the base model's name
    # (named adapter_members in Python: `adapters` is the engine's, which the API never touches: tests/test_api_seam.py)
    adapter_members: Annotated[list[AdapterMember], Field(min_length=1, max_length=MAX_MEMBERS)] | None = Field(None, alias="adapters")
    merge_strategy: Annotated[Text, Field(max_length=64)] | None = None  # "linear" (the default) only


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    echo: bool = False
    suffix: Text | None = None


class ContentPart(StrictModel):
    type: Text
    text: Text | None = None


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[ContentPart] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = Field(None, ge=0, le=20)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "hotswap"
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
