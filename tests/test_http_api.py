"""The OpenAI API over real HTTP through the official `openai` SDK (and httpx for raw shapes)."""
from __future__ import annotations

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_base_and_every_adapter(client, adapter_dirs):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "smollm2"
    assert set(ids[1:]) == set(adapter_dirs)


def test_chat_completion_answers_with_the_chat_template(client):
    resp = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12, temperature=0
    )
    choice = resp.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 10 and resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_completion_on_an_adapter_differs_from_base(client):
    base = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
    lora = client.completions.create(model="r8-all", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert base.object == "text_completion" and base.choices[0].finish_reason == "length"
    assert base.usage.completion_tokens == 8
    assert base.choices[0].text != lora.choices[0].text


def test_streaming_chat_yields_the_same_text_as_non_streaming(client):
    kwargs = dict(model="r4-qv", messages=[{"role": "user", "content": "Name three colors."}], max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_streaming_completion_ends_with_done(live_server):
    body = {"model": "smollm2", "prompt": "Hello", "max_tokens": 5, "stream": True, "temperature": 0}
    with httpx.stream("POST", live_server.base_url + "/v1/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_stop_string_truncates_the_text(client):
    resp = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"])
    assert resp.choices[0].finish_reason == "stop"
    assert " 7" not in resp.choices[0].text and "6" in resp.choices[0].text


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model="r16-attn", prompt="Once upon a time", max_tokens=16, temperature=0.9, top_p=0.9, seed=1234)
    a = client.completions.create(**kwargs).choices[0].text
    b = client.completions.create(**kwargs).choices[0].text
    assert a == b


def test_unknown_model_is_404_with_openai_error_body(client, live_server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    r = httpx.post(live_server.base_url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_prompt_longer_than_the_context_is_400(client, server_engine):
    engine = server_engine
    too_long = list(range(100, 100 + engine.max_model_len + 1))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt=too_long, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smollm2", prompt="hi", max_tokens=engine.max_model_len)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "smollm2", "prompt": "x", "temperature": -1}, "temperature"),
        ({"model": "smollm2", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "smollm2", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "smollm2"}, "prompt"),
        ({"model": "smollm2", "prompt": "x", "logprobs": 21}, "logprobs"),
        ({"model": "smollm2", "prompt": [], "max_tokens": 1}, "prompt"),
        ({"model": "smollm2", "prompt": [999999999]}, "prompt"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(live_server, body, param):
    r = httpx.post(live_server.base_url + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_malformed_json_is_400(live_server):
    r = httpx.post(live_server.base_url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "error" in r.json()


def test_health_and_metrics(live_server, client):
    client.completions.create(model="r2-mlp", prompt="Hi", max_tokens=2)
    h = httpx.get(live_server.base_url + "/health").json()
    assert h["status"] == "ready" and h["model"] == "smollm2"  # open mode: every caller is the admin
    assert h["quantization"] == "none" and h["kernels"]["adapters"].startswith("torch-cpu")  # what the engine picked
    assert (h["device"], h["dtype"], h["decode_fast_path"]) == ("cpu", "float32", "off (eager)") and "SDPA" in h["kernels"]["attention"]
    text = httpx.get(live_server.base_url + "/metrics").text
    for name in (
        "hotswap_requests_total", "hotswap_request_latency_seconds", "hotswap_time_to_first_token_seconds",
        "hotswap_time_per_output_token_seconds", "hotswap_requests_running", "hotswap_requests_waiting",
        "hotswap_kv_cache_blocks_used", "hotswap_batch_size", "hotswap_step_adapters",
    ):
        assert name in text, name


def test_api_key_is_required_when_configured(model_dir, adapter_dirs):
    from server.api.app import build_app
    from tests.conftest import LiveServer

    from tests.conftest import _engine

    with LiveServer(build_app(_engine(model_dir, {}), api_key="s3cret")) as srv:
        bad = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "smollm2"
        public = httpx.get(srv.base_url + "/health")
        assert public.status_code == 200 and public.json() == {"status": "ready"}  # probes need no key, and learn nothing else
        detailed = httpx.get(srv.base_url + "/health", headers={"Authorization": "Bearer s3cret"}).json()
        assert detailed["model"] == "smollm2" and "kernels" in detailed
        assert httpx.get(srv.base_url + "/openapi.json").status_code == 404  # no API map for strangers


def test_cli_refuses_a_public_address_without_a_key(capsys):
    from server.cli import main

    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "admin key" in capsys.readouterr().err


def test_cli_help_lists_the_serve_flags(capsys):
    from server.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--adapter", "--adapters-dir", "--dtype", "--max-num-seqs", "--kv-cache-tokens", "--host", "--port"):
        assert flag in out
