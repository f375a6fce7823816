"""Request and response shapes of the OpenAI API (the parts hotswap serves), validated strictly (server.validation)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, model_validator

from adapters_store.user_state import MAX_USER_CHARS
from server.adapters.stacking import MAX_ABS_WEIGHT, MAX_MEMBERS
from server.validation import StrictModel, Text
from server.engine.client import MAX_LOGIT_BIAS, MAX_LOGPROBS, MIN_TEMPERATURE

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_SEQUENCES, MAX_STOP_CHARS = 16, 1024
MAX_STOP_TOKEN_IDS = 256
MAX_MESSAGES = 4096  # bounds the work of validating and rendering one conversation
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-6, 1e6


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


# -- structured output (server.api.openai.structured) -----------------------------------------------
MAX_CHOICES = 256  # guided_choice strings (server.engine.guided.MAX_CHOICES)
MAX_TOOLS, MAX_TOOL_CALLS = 128, 128
FunctionName = Annotated[Text, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]  # OpenAI's names, plus . and :
JsonSchema = dict | bool  # a JSON schema document, checked and compiled in server.engine.guided


class JsonSchemaFormat(StrictModel):
    name: FunctionName
    description: Text | None = None
    schema_: JsonSchema | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(StrictModel):
    """vLLM's `structured_outputs` (exactly one constraint)."""

    json_: JsonSchema | Text | None = Field(None, alias="json")
    regex: Text | None = None
    choice: Annotated[list[Text], Field(max_length=MAX_CHOICES)] | None = None
    grammar: Text | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: Text | None = None  # refused: xgrammar has no whitespace pattern
    structural_tag: Text | None = None  # refused: not served


# -- tools (server.api.openai.tools) ----------------------------------------------------------------
class FunctionDefinition(StrictModel):
    name: FunctionName
    description: Text | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ChatTool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionRef(StrictModel):
    name: FunctionName


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: FunctionRef


class FunctionCall(StrictModel):
    name: FunctionName
    arguments: Text  # JSON text, as OpenAI sends it


class ToolCall(StrictModel):
    id: Annotated[Text, Field(max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCall


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
    # extensions (vLLM): a multiplicative penalty of prompt and output tokens (1 = off; bounded so that
    # float32 logits stay finite), and EOS / stop_token_ids kept out until min_tokens were generated
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    min_tokens: int = Field(0, ge=0, le=2**31 - 1)  # at most max_tokens: checked when the request is served
    # token id (as a string, JSON's keys are) -> bias; ids past the vocabulary are refused when served
    logit_bias: Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")], Annotated[float, Field(ge=-100.0, le=100.0)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None  # fmt: skip
    # extension (LoRAX-style merged adapters): `model` is then the base model's name
    # (named adapter_members in Python: `adapters` is the engine's, which the API never touches: tests/test_api_seam.py)
    adapter_members: Annotated[list[AdapterMember], Field(min_length=1, max_length=MAX_MEMBERS)] | None = Field(None, alias="adapters")
    merge_strategy: Annotated[Text, Field(max_length=64)] | None = None  # "linear" (the default) only
    # structured output: OpenAI's response_format; vLLM's structured_outputs and its older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: JsonSchema | Text | None = None
    guided_regex: Text | None = None
    guided_choice: Annotated[list[Text], Field(max_length=MAX_CHOICES)] | None = None
    guided_grammar: Text | None = None


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # OpenAI's limit is 5, vLLM's (--max-logprobs) 20
    echo: bool = False
    suffix: Text | None = None


class ContentPart(StrictModel):
    type: Text
    text: Text | None = None


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Annotated[Text, Field(max_length=64)] | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOL_CALLS)] | None = None  # an assistant's
    tool_call_id: Annotated[Text, Field(max_length=256)] | None = None  # a tool result's: the call it answers

    @model_validator(mode="after")
    def _tool_fields(self) -> "ChatMessage":
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only tool messages carry a tool_call_id")
        return self


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # needs logprobs: checked when the request is served
    tools: Annotated[list[ChatTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


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
    max_model_len: int | None = None  # vLLM's extension, on the base model's card: its context length


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
