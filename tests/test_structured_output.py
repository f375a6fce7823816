"""Structured output over HTTP (response_format, vLLM's guided_* and structured_outputs) through the `openai`
SDK against the embedded model: outputs follow their grammar for the base model and adapters in one batch,
and a bad or oversized spec is a 400 with the reason."""
from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest

from server.engine.guided import MAX_SPEC_BYTES

SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["color", "size"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a ball as JSON with its color and size."}]


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_json_schema_outputs_validate_for_the_base_model_and_two_adapters_in_one_batch(live_server):
    client = openai.AsyncOpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    fmt = {"type": "json_schema", "json_schema": {"name": "ball", "schema": SCHEMA, "strict": True}}

    async def ask(model: str, free: bool = False):
        return await client.chat.completions.create(model=model, messages=ASK, max_tokens=24, temperature=0,
                                                    **({} if free else {"response_format": fmt}))  # fmt: skip

    async def all_at_once():
        # a free request in the same batch keeps its own (unmasked) output
        return await asyncio.gather(ask("smollm2"), ask("r4-qv"), ask("r8-all"), ask("smollm2", free=True))

    *guided, free = asyncio.run(all_at_once())
    for r in guided:
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    assert not free.choices[0].message.content.startswith('{"color"')


def test_json_object_regex_and_choice_follow_their_grammars(client):
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": 'Repeat this JSON: {"ok": true}'}], max_tokens=24,
                                       temperature=0, response_format={"type": "json_object"})  # fmt: skip
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)

    r = client.chat.completions.create(model="r4-qv", messages=[{"role": "user", "content": "A product code?"}], max_tokens=12, temperature=0,
                                       extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{3}"})  # fmt: skip
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", r.choices[0].message.content)

    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Is the sky green?"}], max_tokens=4,
                                       temperature=0.8, seed=3, extra_body={"guided_choice": ["yes", "no", "maybe so"]})  # fmt: skip
    assert r.choices[0].message.content in ("yes", "no", "maybe so")

    # vLLM's structured_outputs, on the completions endpoint, streamed
    stream = client.completions.create(model="smollm2", prompt="The answer:", max_tokens=6, temperature=0, stream=True,
                                       extra_body={"structured_outputs": {"choice": ["alpha", "beta"]}})  # fmt: skip
    assert "".join(c.choices[0].text for c in stream) in ("alpha", "beta")


def test_a_schema_that_cannot_compile_is_a_400_with_the_reason(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})  # fmt: skip
    assert "nonsense" in e.value.message and "cannot be compiled" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=4, extra_body={"guided_regex": "(unclosed"})
    assert "regex cannot be compiled" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # two constraints at once
        client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=4, response_format={"type": "json_object"},
                                       extra_body={"guided_regex": "a+"})  # fmt: skip
    assert "one output constraint" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # min_tokens would hold end-of-text back past a complete structure
        client.completions.create(model="smollm2", prompt="Answer:", max_tokens=8, extra_body={"guided_choice": ["yes"], "min_tokens": 4})
    assert e.value.body["param"] == "min_tokens"


def test_a_huge_or_deep_schema_is_refused_before_compiling(client):
    huge = {"type": "object", "properties": {f"field_{i}": {"type": "string", "description": "x" * 64} for i in range(400)}}
    assert len(json.dumps(huge)) > MAX_SPEC_BYTES
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=4, extra_body={"guided_json": huge})
    assert f"at most {MAX_SPEC_BYTES}" in e.value.message and e.value.body["param"] == "guided_json"
    deep: dict = {"type": "string"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {"name": "deep", "schema": deep}})  # fmt: skip
    assert "levels deep" in e.value.message


def test_tools_for_a_model_whose_template_ignores_them_are_a_400(client):
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as e:  # SmolLM2-135M-Instruct's template has no `tools`
        client.chat.completions.create(model="smollm2", messages=ASK, tools=[tool], max_tokens=4)
    assert "does not render tools" in e.value.message and e.value.body["param"] == "tools"
