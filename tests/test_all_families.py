"""One batch holding every family — LoRA, S²FT, RecLoRA users, routed experts, an SG-LoRA-generated
adapter — plus the base model, through the real HTTP server: each request equals itself served alone."""
from __future__ import annotations

import asyncio

import httpx
import openai
import torch

from loadtests.synthetic import s2ft_files
from server.models.config import ModelConfig
from tests.test_moe_lora import make_mixlora
from tests.test_reclora import make_reclora


def _upload(http, name, files, **fields):
    r = http.post("/admin/v1/adapters", data={"tenant": "t", "name": name, **fields}, files={k: (k, v) for k, v in files.items()})
    assert r.status_code == 201, r.text
    return r.json()


def test_every_family_and_base_in_one_batch_equal_each_alone(model_dir, adapter_dirs, tmp_path):
    from server.adapters.service import build_adapter_service
    from server.api.app import build_app
    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from tests.conftest import LiveServer

    cfg = ModelConfig.from_dir(model_dir)
    engine = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, kv_cache_tokens=8192, served_model_name="base"))
    service = build_adapter_service(engine, str(tmp_path / "store"), None, tmp_path / "cache", 1 << 30, 1 << 30)
    with LiveServer(build_app(engine, adapter_service=service)) as srv:
        http = httpx.Client(base_url=srv.base_url, timeout=120)
        assert http.post("/admin/v1/tenants", json={"name": "t"}).status_code == 201
        lora = lambda key: {n: (adapter_dirs[key] / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}  # noqa: E731
        assert _upload(http, "lora", lora("r8-all"), description="answer customer support questions")["family"] == "lora"
        _upload(http, "lora2", lora("r16-attn"), description="write Python code")
        assert _upload(http, "s2", s2ft_files(cfg, torch.Generator().manual_seed(0), fraction=0.05))["family"] == "s2ft"
        assert _upload(http, "moe", make_mixlora(cfg, "top_k", 2)[0])["family"] == "moe-lora"
        assert _upload(http, "rec", make_reclora(cfg)[0])["family"] == "reclora"
        assert http.put("/admin/v1/adapters/t/rec/users/alice", json={"weights": [0.7, 0.1, 0.1, 0.1]}).status_code == 200
        r = http.post("/admin/v1/adapters:generate", json={"tenant": "t", "name": "sg", "description": "help customers write Python", "top_k": 2})
        assert r.status_code == 201, r.text

        client = openai.AsyncOpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
        jobs = [("t/lora", None), ("t/s2", None), ("t/moe", None), ("t/rec", "alice"), ("t/rec", "bob"), ("t/sg", None), ("base", None)]
        jobs = [(m, u, p) for p in ("The capital of France is", "def add(a, b):") for m, u in jobs]

        async def one(model, user, prompt):
            kwargs = {"user": user} if user else {}
            out = await client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}, **kwargs)
            return out.choices[0].text

        async def run():
            together = await asyncio.gather(*(one(*j) for j in jobs))
            alone = [await one(*j) for j in jobs]
            return together, alone

        together, alone = asyncio.run(run())
        assert together == alone
        step_adapters = [line for line in httpx.get(srv.base_url + "/metrics").text.splitlines() if line.startswith("hotswap_step_adapters_bucket")]
        # some step held at least six distinct adapters at once (the le="4.0" bucket is not everything)
        counts = {line.split('le="')[1].split('"')[0]: float(line.split()[-1]) for line in step_adapters}
        assert counts["4.0"] < counts["+Inf"]
