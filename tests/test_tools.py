"""Tool calling over HTTP through the `openai` SDK: a copy of the embedded model whose chat template renders
tools Hermes-style (`<tool_call>{json}</tool_call>`, as Qwen2.5 / Hermes templates do) serves tool_choice
"required", a named function (arguments valid under its schema) and "auto" (the output parsed), whole and
streamed; a model whose template ignores tools refuses them."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from server.api.openai.tools import ToolPlan, parse_hermes

HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
You can call functions. Tools:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Reply with <tool_call>{"name": <name>, "arguments": <args>}</tool_call>.<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                       "required": ["city", "days"], "additionalProperties": False},  # fmt: skip
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                                                            "required": ["zone"], "additionalProperties": False}}}  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]


@pytest.fixture(scope="module")
def tool_server(model_dir, tmp_path_factory):
    """A server over a copy of the embedded model (files linked) whose chat template renders tools."""
    from server.api.app import build_app
    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from tests.conftest import LiveServer

    copy = tmp_path_factory.mktemp("hermes") / "smollm2-tools"
    copy.mkdir()
    for f in model_dir.iterdir():
        if f.name != "chat_template.jinja":
            (copy / f.name).symlink_to(f)
    (copy / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    engine = LLMEngine(EngineConfig(quantization="none", model=copy, kv_cache_tokens=2048, enforce_eager=True, served_model_name="tools"))
    with LiveServer(build_app(engine)) as srv:
        yield openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_required_tool_choice_calls_one_of_the_tools_with_valid_arguments(tool_server):
    r = tool_server.chat.completions.create(model="tools", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=48, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_a_named_function_is_called_with_arguments_valid_under_its_schema_whole_and_streamed(tool_server):
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = tool_server.chat.completions.create(model="tools", messages=ASK, tools=[WEATHER, TIME], tool_choice=named, max_tokens=24, temperature=0)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    stream = tool_server.chat.completions.create(model="tools", messages=ASK, tools=[WEATHER], tool_choice=named, max_tokens=24, temperature=0, stream=True)
    names, arguments = [], ""
    for chunk in stream:
        for d in chunk.choices[0].delta.tool_calls or []:
            assert d.index == 0
            if d.function.name:
                names.append(d.function.name)
            arguments += d.function.arguments or ""
    assert names == ["get_weather"] and arguments == call.function.arguments  # greedy: the same call


def test_auto_tool_choice_parses_hermes_calls_and_takes_tool_messages_back(tool_server):
    # the output is forced into a Hermes call with a regex, so the parse is tested whatever the model prefers
    forced = r'<tool_call>\{"name": "get_time", "arguments": \{"zone": "(UTC|CET)"\}\}</tool_call>'
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                               "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": "And the time?"},
    ]  # fmt: skip
    r = tool_server.chat.completions.create(model="tools", messages=history, tools=[WEATHER, TIME], max_tokens=40, temperature=0,
                                            extra_body={"guided_regex": forced})  # fmt: skip
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_time"
    assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")

    stream = tool_server.chat.completions.create(model="tools", messages=history, tools=[WEATHER, TIME], max_tokens=40, temperature=0,
                                                 stream=True, extra_body={"guided_regex": forced})  # fmt: skip
    chunks = list(stream)
    calls = [d for c in chunks for d in (c.choices[0].delta.tool_calls if c.choices else None) or []]
    assert [c.function.name for c in calls] == ["get_time"] and calls[0].function.arguments == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_requests_that_cannot_be_served_are_400s(tool_server):
    # (a template that ignores tools: tests/test_structured_output.py, against the embedded model's own)
    with pytest.raises(openai.BadRequestError) as e:
        tool_server.chat.completions.create(model="tools", messages=ASK, tools=[WEATHER], max_tokens=4,
                                            tool_choice={"type": "function", "function": {"name": "nope"}})  # fmt: skip
    assert "not among the tools" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        tool_server.chat.completions.create(model="tools", messages=[{"role": "tool", "content": "x"}], max_tokens=4)
    assert "tool_call_id" in e.value.message


def test_hermes_parsing_and_streaming_split_content_from_calls():
    calls, content = parse_hermes('Sure.<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>\n<tool_call>{"name": "g"}</tool_call>')
    assert calls == [("f", '{"a": 1}'), ("g", "{}")] and content == "Sure."
    assert parse_hermes("<tool_call>{not json</tool_call>") == ([], "<tool_call>{not json</tool_call>")
    stream = ToolPlan("auto", []).streamer()
    deltas = []
    for piece in ["Hi <", "tool", '_call>{"name": "f", "arguments": {}}', "</tool_call>"]:
        deltas += stream.feed(piece, False)
    deltas += stream.feed("", True)
    assert deltas[0] == {"content": "Hi "} and [d["tool_calls"][0]["function"]["name"] for d in deltas[1:]] == ["f"]
    assert stream.called
