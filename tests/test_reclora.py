"""RecLoRA: per-user mixtures of meta-LoRAs, selected by the OpenAI `user` field, equal a plain dense reference."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch
from safetensors.torch import save as safetensors_save

from kernels import reclora_bank, reclora_bank_reference
from server.lora.peft import module_dims

K, R, ALPHA, USER_DIM, HIDDEN, TEMP = 4, 8, 16, 16, 32, 0.5
TARGETS = ("q_proj", "v_proj", "down_proj")


def make_reclora(cfg, seed=0, gate=True) -> tuple[dict[str, bytes], dict]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for module in TARGETS:
            d_in, d_out = module_dims(cfg, module)
            block = "mlp" if module == "down_proj" else "self_attn"
            tensors[f"model.layers.{layer}.{block}.{module}.reclora_A"] = torch.randn(K, R, d_in, generator=g) / d_in**0.5
            tensors[f"model.layers.{layer}.{block}.{module}.reclora_B"] = torch.randn(K, d_out, R, generator=g) * 0.15
    if gate:
        tensors["reclora_gate.0.weight"] = torch.randn(HIDDEN, USER_DIM, generator=g)
        tensors["reclora_gate.0.bias"] = torch.randn(HIDDEN, generator=g)
        tensors["reclora_gate.2.weight"] = torch.randn(K, HIDDEN, generator=g)
        tensors["reclora_gate.2.bias"] = torch.randn(K, generator=g)
    config = {"peft_type": "RECLORA", "r": R, "lora_alpha": ALPHA, "num_meta_loras": K, "target_modules": list(TARGETS), "gate_temperature": TEMP}
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": safetensors_save(tensors)}, tensors


def dense_reference_generate(model_dir, tensors, w, prompt, n):
    """Merge ΔW_u = s (Σ w B)(Σ w A) into a plain HF model and generate greedily."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for key, a in tensors.items():
            if not key.endswith("reclora_A"):
                continue
            b = tensors[key.replace("reclora_A", "reclora_B")]
            a_u, b_u = torch.einsum("k,kri->ri", w, a), torch.einsum("k,kor->or", w, b)
            params[key.replace("reclora_A", "weight")] += (ALPHA / R) * (b_u @ a_u)
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = hf.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def gate_weights(tensors, u):
    h = torch.relu(u @ tensors["reclora_gate.0.weight"].T + tensors["reclora_gate.0.bias"])
    return torch.softmax((h @ tensors["reclora_gate.2.weight"].T + tensors["reclora_gate.2.bias"]) / TEMP, -1)


@pytest.fixture(scope="module")
def rec_server(model_dir, adapter_dirs, tmp_path_factory):
    from server.adapters.service import build_adapter_service
    from server.api.app import build_app
    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from tests.conftest import LiveServer

    root = tmp_path_factory.mktemp("reclora")
    engine = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, kv_cache_tokens=4096, served_model_name="smollm2"))
    service = build_adapter_service(engine, str(root / "store"), None, root / "cache", 1 << 30, 1 << 30)
    with LiveServer(build_app(engine, adapter_service=service)) as srv:
        srv.http = httpx.Client(base_url=srv.base_url, timeout=120)
        assert srv.http.post("/admin/v1/tenants", json={"name": "shop"}).status_code == 201
        files, tensors = make_reclora(engine.model.config)
        r = srv.http.post("/admin/v1/adapters", data={"tenant": "shop", "name": "recs"}, files={k: (k, v) for k, v in files.items()})
        assert r.status_code == 201, r.text
        assert r.json()["family"] == "reclora" and r.json()["ranks"]["q_proj"] == R
        lora = {n: (n, (adapter_dirs["r8-all"] / n).read_bytes()) for n in ("adapter_config.json", "adapter_model.safetensors")}
        assert srv.http.post("/admin/v1/adapters", data={"tenant": "shop", "name": "plain"}, files=lora).status_code == 201
        srv.tensors = tensors
        srv.client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
        yield srv


def _complete(client, user, prompt="I would like to buy", n=12, model="shop/recs"):
    kwargs = {"user": user} if user else {}
    return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, extra_body={"ignore_eos": True}, **kwargs).choices[0].text


def test_stored_weights_vector_and_unknown_user_each_equal_the_dense_reference(rec_server, model_dir):
    srv = rec_server
    alice_w = [0.7, 0.1, 0.15, 0.05]
    assert srv.http.put("/admin/v1/adapters/shop/recs/users/alice", json={"weights": alice_w}).status_code == 200
    bob_u = torch.randn(USER_DIM, generator=torch.Generator().manual_seed(3))
    assert srv.http.put("/admin/v1/adapters/shop/recs/users/bob", json={"vector": bob_u.tolist()}).status_code == 200
    cases = {
        "alice": torch.tensor(alice_w),
        "bob": gate_weights(srv.tensors, bob_u),
        "carol": torch.full((K,), 1 / K),  # no stored state: uniform weights (documented)
    }
    outs = {}
    for user, w in cases.items():
        outs[user] = _complete(srv.client, user)
        assert outs[user] == dense_reference_generate(model_dir, srv.tensors, w, "I would like to buy", 12), user
    assert len(set(outs.values())) == 3  # personalisation changes the output
    assert _complete(srv.client, None) == outs["carol"]  # no `user` field: uniform too


def test_users_share_a_batch_with_lora_and_base(rec_server):
    srv = rec_server
    client = openai.AsyncOpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    jobs = [("shop/recs", "alice"), ("shop/recs", "bob"), ("shop/recs", "dave"), ("shop/plain", None), ("smollm2", None)] * 2

    async def one(model, user):
        kwargs = {"user": user} if user else {}
        r = await client.completions.create(model=model, prompt="Recommend me", max_tokens=10, temperature=0, **kwargs)
        return r.choices[0].text

    async def run():
        together = await asyncio.gather(*(one(m, u) for m, u in jobs))
        alone = [await one(m, u) for m, u in jobs]
        return together, alone

    together, alone = asyncio.run(run())
    assert together == alone


def test_updating_a_users_state_takes_effect(rec_server):
    srv = rec_server
    srv.http.put("/admin/v1/adapters/shop/recs/users/erin", json={"weights": [1, 0, 0, 0]})
    first = _complete(srv.client, "erin")
    srv.http.put("/admin/v1/adapters/shop/recs/users/erin", json={"weights": [0, 0, 0, 1]})
    assert _complete(srv.client, "erin") != first
    assert srv.http.get("/admin/v1/adapters/shop/recs/users/erin").json()["weights"] == [0, 0, 0, 1]


def test_unknown_users_share_one_materialised_adapter(rec_server):
    """Users are materialised per state: inventing user names cannot fill the caches and evict others."""
    def device_misses() -> float:
        metrics = rec_server.http.get("/metrics").text
        return float(next(line.split()[1] for line in metrics.splitlines() if line.startswith('hotswap_adapter_cache_misses_total{tier="device"}')))

    _complete(rec_server.client, "first-stranger", n=2)
    before = device_misses()
    for i in range(4):
        _complete(rec_server.client, f"stranger-{i}", n=2)
    assert device_misses() == before


def test_bad_user_state_and_malformed_reclora_are_4xx(rec_server, model_dir):
    srv = rec_server
    assert srv.http.put("/admin/v1/adapters/shop/recs/users/x", json={"weights": [1, 2]}).status_code == 400
    assert srv.http.put("/admin/v1/adapters/shop/recs/users/x", json={"vector": [1.0] * 3}).status_code == 400
    assert srv.http.put("/admin/v1/adapters/shop/recs/users/x", json={}).status_code == 400
    assert srv.http.put("/admin/v1/adapters/shop/plain/users/x", json={"weights": [1, 0, 0, 0]}).status_code == 400
    assert srv.http.put("/admin/v1/adapters/shop/nope/users/x", json={"weights": [1, 0, 0, 0]}).status_code == 404
    # found by tests/test_fuzz_api.py: pinning a bank was a 500 (there is no one device copy of it)
    r = srv.http.post("/admin/v1/adapters/shop/recs/pin")
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_pinnable"
    from server.models.config import ModelConfig

    files, tensors = make_reclora(ModelConfig.from_dir(model_dir), gate=False)
    key = next(k for k in tensors if k.endswith("reclora_A"))
    tensors[key] = tensors[key][:, :, :100].contiguous()
    files["adapter_model.safetensors"] = safetensors_save(tensors)
    r = srv.http.post("/admin/v1/adapters", data={"tenant": "shop", "name": "broken"}, files={k: (k, v) for k, v in files.items()})
    assert r.status_code == 400 and "reclora_A" in r.json()["error"]["message"]


@pytest.mark.parametrize("tokens", [1, 7, 32])
def test_bank_formulation_equals_reference_and_materialised_lora(tokens):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 64, generator=g)
    a, b = torch.randn(K, R, 64, generator=g), torch.randn(K, 48, R, generator=g)
    w = torch.softmax(torch.randn(tokens, K, generator=g), -1)
    y0 = torch.randn(tokens, 48, generator=g)
    fast, ref = y0.clone(), y0.clone()
    reclora_bank(fast, x, a, b, w, 0.5)
    reclora_bank_reference(ref, x, a, b, w, 0.5)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for t in range(tokens):  # the materialised per-user LoRA gives the same delta
        a_u, b_u = torch.einsum("k,kri->ri", w[t], a), torch.einsum("k,kor->or", w[t], b)
        torch.testing.assert_close(y0[t] + 0.5 * (x[t] @ a_u.T) @ b_u.T, ref[t], rtol=1e-5, atol=1e-5)
