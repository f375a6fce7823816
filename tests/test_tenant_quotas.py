"""Per-tenant quotas (429 + Retry-After), weights and per-tenant metrics, through a live server.

The server counts "per minute" over a 4 s window here (TenantQuotas(window_s=...)), so that a
refused tenant recovers within the test; the product default is 60 s."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from server.adapters.service import build_adapter_service
from server.api.app import build_app
from server.api.quotas import QuotaExceeded, SlidingWindow, TenantQuotas
from server.config import EngineConfig
from tests.conftest import LiveServer

ADMIN = "admin-secret"
WINDOW_S = 4.0


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    from server.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, kv_cache_tokens=4096, served_model_name="smollm2"))
    root = tmp_path_factory.mktemp("quotas")
    service = build_adapter_service(engine, str(root / "store"), None, root / "cache", 1 << 30, 1 << 30)
    app = build_app(engine, api_key=ADMIN, adapter_service=service)
    serving = app.state.serving
    serving.quotas = TenantQuotas(window_s=WINDOW_S)
    sequences = []  # every sequence the API hands the engine, to read its tenant and weight
    generate = serving.engine.generate

    def recording_generate(seq):
        sequences.append(seq)
        return generate(seq)

    serving.engine.generate = recording_generate
    with LiveServer(app) as srv:
        srv.admin = httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
        srv.sequences = sequences
        yield srv


def tenant(srv, name: str, **settings) -> httpx.Client:
    """A new tenant with `settings`, and an HTTP client holding its key."""
    assert srv.admin.post("/admin/v1/tenants", json={"name": name}).status_code == 201
    if settings:
        r = srv.admin.patch(f"/admin/v1/tenants/{name}", json=settings)
        assert r.status_code == 200, r.text
    key = srv.admin.post(f"/admin/v1/tenants/{name}/keys").json()["key"]
    return httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def complete(client: httpx.Client, max_tokens: int = 1, **extra) -> httpx.Response:
    return client.post("/v1/completions", json={"model": "smollm2", "prompt": "The capital of France is", "max_tokens": max_tokens,
                                                "temperature": 0, **extra})  # fmt: skip


def assert_rate_limited(r: httpx.Response, kind: str) -> int:
    """The 429 as OpenAI answers it; returns its Retry-After in seconds."""
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"]) == (kind, "rate_limit_exceeded") and "Rate limit reached" in error["message"]
    retry_after = int(r.headers["retry-after"])
    assert 1 <= retry_after <= WINDOW_S
    return retry_after


def metric(srv, line_start: str) -> float:
    text = httpx.get(srv.base_url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def test_requests_per_minute_answer_429_with_retry_after_then_recover(server):
    client = tenant(server, "rpm", requests_per_minute=2)
    assert complete(client).status_code == 200 and complete(client).status_code == 200
    retry_after = assert_rate_limited(complete(client), "requests")
    time.sleep(retry_after)
    assert complete(client).status_code == 200


def test_the_openai_sdk_sees_a_rate_limit_error(server):
    http = tenant(server, "sdk", requests_per_minute=1)
    sdk = openai.OpenAI(base_url=server.base_url + "/v1", api_key=http.headers["authorization"].split()[1], max_retries=0)
    sdk.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    assert refused.value.code == "rate_limit_exceeded" and refused.value.response.headers["retry-after"].isdigit()


def test_tokens_per_minute_count_prompt_and_completion_tokens(server):
    client = tenant(server, "tpm", tokens_per_minute=20)
    r = complete(client, max_tokens=16, ignore_eos=True)  # the window is empty: accepted, and it overshoots
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] > 20
    retry_after = assert_rate_limited(complete(client), "tokens")
    time.sleep(retry_after)
    assert complete(client).status_code == 200


def test_concurrent_requests_are_limited_until_a_stream_ends_or_its_client_leaves(server):
    client = tenant(server, "conc", max_concurrent_requests=1)
    body = {"model": "smollm2", "prompt": "Count: one, two,", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()  # kept: dropping the iterator would close the connection
        assert next(lines).startswith("data: ")  # generating
        r = complete(client)
        assert assert_rate_limited(r, "requests") == 1
        assert "concurrent" in r.json()["error"]["message"]
    # the client hung up mid-stream: its slot comes back
    deadline = time.monotonic() + 10
    while (r := complete(client)).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.status_code == 200
    # a request that fails gives its slot back too, and so does a stream that runs to its end
    r = client.post("/v1/completions", json={"model": "no-such-model", "prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 404
    r = complete(client, max_tokens=2, stream=True)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    assert complete(client).status_code == 200


def test_changed_quotas_apply_to_the_next_request_without_a_restart(server):
    client = tenant(server, "patched")
    for _ in range(3):
        assert complete(client).status_code == 200
    r = server.admin.patch("/admin/v1/tenants/patched", json={"requests_per_minute": 2, "weight": 3})
    assert r.status_code == 200 and (r.json()["requests_per_minute"], r.json()["weight"]) == (2, 3.0)
    assert_rate_limited(complete(client), "requests")  # the three earlier requests count
    assert server.admin.patch("/admin/v1/tenants/patched", json={"requests_per_minute": None}).status_code == 200
    assert complete(client, n=2).status_code == 200
    assert [(s.tenant, s.tenant_weight) for s in server.sequences[-2:]] == [("patched", 3.0)] * 2  # its share, on every choice
    assert complete(server.admin).status_code == 200
    assert (server.sequences[-1].tenant, server.sequences[-1].tenant_weight) == (None, 1.0)
    view = server.admin.get("/admin/v1/tenants/patched").json()
    assert view["weight"] == 3.0 and view["requests_per_minute"] is None and view["tokens_per_minute"] is None
    assert "sha256" not in str(view) and len(view["keys"]) == 1


def test_one_tenants_quota_never_affects_another_nor_the_admin(server):
    first, second = tenant(server, "first", requests_per_minute=1), tenant(server, "second", requests_per_minute=1)
    assert complete(first).status_code == 200
    assert_rate_limited(complete(first), "requests")
    assert complete(second).status_code == 200  # its own budget, untouched by `first`
    for _ in range(4):  # the admin has no quota
        assert complete(server.admin).status_code == 200


def test_invalid_settings_are_refused(server):
    tenant(server, "strict")
    bad = [
        ({"weight": 0}, "weight"), ({"weight": -1}, "weight"), ({"weight": None}, "weight"), ({"weight": "heavy"}, "weight"),
        ({"weight": 1e9}, "weight"), ({"requests_per_minute": 0}, "requests_per_minute"), ({"tokens_per_minute": 1.5}, "tokens_per_minute"),
        ({"tokens_per_minute": "100"}, "tokens_per_minute"), ({"max_concurrent_requests": True}, "max_concurrent_requests"),
        ({"max_concurrent": 4}, "max_concurrent"), ({}, None),
    ]  # fmt: skip
    for body, param in bad:
        r = server.admin.patch("/admin/v1/tenants/strict", json=body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param, (body, error)
    assert server.admin.patch("/admin/v1/tenants/strict", content=b"[1]", headers={"content-type": "application/json"}).status_code == 400
    assert server.admin.patch("/admin/v1/tenants/nobody", json={"weight": 2}).status_code == 404
    assert server.admin.patch("/admin/v1/tenants/Bad!Name", json={"weight": 2}).status_code == 400
    assert server.admin.get("/admin/v1/tenants/nobody").status_code == 404
    assert httpx.patch(server.base_url + "/admin/v1/tenants/strict", json={"weight": 2}).status_code == 401
    assert server.admin.get("/admin/v1/tenants/strict").json()["weight"] == 1.0  # nothing was changed


def test_metrics_carry_the_tenant_label_and_count_429s(server):
    client = tenant(server, "metered", requests_per_minute=1)
    assert complete(client, max_tokens=3, ignore_eos=True).status_code == 200
    assert complete(client).status_code == 429
    assert complete(server.admin).status_code == 200
    assert metric(server, 'hotswap_rate_limited_requests_total{limit="requests_per_minute",tenant="metered"}') == 1
    assert metric(server, 'hotswap_requests_total{endpoint="completions",outcome="length",tenant="metered"}') == 1
    assert metric(server, 'hotswap_generation_tokens_total{tenant="metered"}') == 3
    assert metric(server, 'hotswap_prompt_tokens_total{tenant="metered"}') > 0
    assert metric(server, 'hotswap_time_to_first_token_seconds_count{tenant="metered"}') == 1
    assert metric(server, 'hotswap_queue_time_seconds_count{tenant="metered"}') == 1
    assert metric(server, 'hotswap_prefix_cache_queried_tokens_total{tenant="metered"}') == metric(server, 'hotswap_prompt_tokens_total{tenant="metered"}')
    assert metric(server, 'hotswap_prefix_cache_hit_tokens_total{tenant="metered"}') >= 0
    assert metric(server, 'hotswap_requests_total{endpoint="completions",outcome="length",tenant="_admin"}') >= 1


def test_sliding_window_sums_the_last_window_and_says_when_it_frees_up():
    window = SlidingWindow(window_s=60, resolution_s=1)
    window.add(0.0, 5)
    window.add(0.5, 5)  # the same second: one entry
    window.add(30.0, 10)
    assert window.total(30.0) == 20
    assert window.seconds_until_below(20, 30.0) == 30  # the first second's 10 leave at t=60
    assert window.seconds_until_below(5, 30.0) == 60  # all of it must go
    assert window.seconds_until_below(21, 30.0) == 0
    assert window.total(60.0) == 10 and window.total(90.0) == 0


def test_quotas_count_every_tenant_apart_and_never_the_admin():
    now = [0.0]
    quotas = TenantQuotas(window_s=60, clock=lambda: now[0])
    from adapters_store.tenants import TenantSettings

    limited = TenantSettings(max_concurrent_requests=1, tokens_per_minute=10)
    lease = quotas.admit("a", limited)
    with pytest.raises(QuotaExceeded) as refused:
        quotas.admit("a", limited)
    assert (refused.value.status, refused.value.limit, refused.value.retry_after_s) == (429, "max_concurrent_requests", 1)
    other = quotas.admit("b", limited)  # another tenant
    admin = [quotas.admit(None, limited) for _ in range(5)]  # never counted
    lease.charge_prompt(8)
    lease.charge(4)
    lease.release()
    lease.release()  # idempotent: the slot is freed once
    with pytest.raises(QuotaExceeded) as refused:
        quotas.admit("a", limited)
    assert refused.value.limit == "tokens_per_minute" and refused.value.type == "tokens"
    now[0] = 61.0
    quotas.admit("a", limited)
    assert other.weight == 1.0 and admin[0].tenant is None


def test_cli_shows_and_sets_a_tenants_weight_and_quotas(server, capsys):
    import json

    from server.cli import main

    common = ["--url", server.base_url, "--admin-key", ADMIN]
    tenant(server, "cli-set", tokens_per_minute=100)
    assert main(["tenants", "set", "cli-set", "--weight", "2.5", "--requests-per-minute", "30", "--tokens-per-minute", "unlimited", *common]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["weight"], shown["requests_per_minute"], shown["tokens_per_minute"], shown["max_concurrent_requests"]) == (2.5, 30, None, None)
    assert main(["tenants", "show", "cli-set", *common]) == 0
    assert json.loads(capsys.readouterr().out)["requests_per_minute"] == 30
    with pytest.raises(SystemExit, match="nothing to change"):
        main(["tenants", "set", "cli-set", *common])
    with pytest.raises(SystemExit, match="HTTP 400: weight"):
        main(["tenants", "set", "cli-set", "--weight", "5000", *common])
    with pytest.raises(SystemExit):
        main(["tenants", "set", "cli-set", "--max-concurrent-requests", "0", *common])  # argparse refuses it
