"""Several adapters in one request (`adapters`, a linear merge served as one rank-stacked LoRA) and vLLM's
runtime /v1/load_lora_adapter and /v1/unload_lora_adapter, over real HTTP through the openai SDK."""
from __future__ import annotations

import json
import math
import os
import threading

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from server.adapters.service import build_adapter_service
from server.api.app import build_app
from server.api.limits import RequestLimits
from server.config import EngineConfig
from tests.conftest import LiveServer

ADMIN = "admin-secret"
PROMPT = "The capital of France is"
TOKENS = 8
MAX_ADAPTER_BYTES = 8 * 2**20


@pytest.fixture(scope="module")
def server(model_dir, adapter_dirs, tmp_path_factory):
    from server.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, kv_cache_tokens=4096, max_lora_rank=32,
                                    served_model_name="smollm2"))  # fmt: skip
    root = tmp_path_factory.mktemp("multi")
    service = build_adapter_service(engine, str(root / "store"), None, root / "cache", 1 << 30, 1 << 30)
    app = build_app(engine, api_key=ADMIN, adapter_service=service, limits=RequestLimits(max_adapter_bytes=MAX_ADAPTER_BYTES))
    with LiveServer(app) as srv:
        srv.engine, srv.service, srv.root = engine, service, root
        srv.admin = httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
        for tenant in ("acme", "globex"):
            assert srv.admin.post("/admin/v1/tenants", json={"name": tenant}).status_code == 201
        srv.keys = {t: srv.admin.post(f"/admin/v1/tenants/{t}/keys").json()["key"] for t in ("acme", "globex")}
        for tenant, name, src, public in [("acme", "support", "r8-rslora", False), ("acme", "legal", "r4-qv", False), ("acme", "wide", "r32-q", False),
                                          ("globex", "secret", "r2-mlp", False), ("globex", "shared", "r12-ko", True)]:  # fmt: skip
            upload(srv, tenant, name, files_of(adapter_dirs[src]), public=public)
        upload(srv, "acme", "dora", dora_files(adapter_dirs["r4-qv"]))
        yield srv


def files_of(adapter_dir) -> dict[str, bytes]:
    return {n: (adapter_dir / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}


def upload(srv, tenant, name, files, public=False):
    r = srv.admin.post("/admin/v1/adapters", data={"tenant": tenant, "name": name, "public": str(public).lower()},
                       files={k: (k, v) for k, v in files.items()})  # fmt: skip
    assert r.status_code == 201, r.text


def dora_files(lora_dir) -> dict[str, bytes]:
    """The same weights declared as DoRA (use_dora) with unit magnitudes: a family that is not a sum of B A products."""
    tensors = load_file(str(lora_dir / "adapter_model.safetensors"))
    for key in [k for k in tensors if k.endswith("lora_B.weight")]:
        tensors[key.replace("lora_B.weight", "lora_magnitude_vector")] = torch.ones(tensors[key].shape[0])
    config = json.loads((lora_dir / "adapter_config.json").read_text()) | {"use_dora": True}
    out = lora_dir.parent / "as-dora"
    out.mkdir(exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": (out / "adapter_model.safetensors").read_bytes()}


def client(srv, tenant=None, key=None):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key=key or srv.keys[tenant], max_retries=0, timeout=120)


def complete(c, model="smollm2", adapters=None, **extra):
    body = {"ignore_eos": True, **extra} | ({"adapters": adapters} if adapters is not None else {})
    return c.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0, extra_body=body).choices[0].text


def stacked_peft_dir(members: list[tuple[object, float]], out):
    """The oracle: the members' PEFT files merged by hand into one PEFT LoRA, A = [A_i], B = [w_i s_i B_i], alpha = r."""
    blocks: dict[str, tuple[list, list]] = {}
    for adapter_dir, weight in members:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        r, alpha = cfg["r"], cfg["lora_alpha"]
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
        for key, a in tensors.items():
            if key.endswith("lora_A.weight"):
                module = key[: -len(".lora_A.weight")]
                b = tensors[module + ".lora_B.weight"]
                a_list, b_list = blocks.setdefault(module, ([], []))
                a_list.append(a.float())
                b_list.append(b.float() * (weight * scale))
    tensors, ranks = {}, {}
    for module, (a_list, b_list) in blocks.items():
        tensors[module + ".lora_A.weight"] = torch.cat(a_list).contiguous()
        tensors[module + ".lora_B.weight"] = torch.cat(b_list, dim=1).contiguous()
        ranks[module.removeprefix("base_model.model.")] = sum(a.shape[0] for a in a_list)
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "target_modules": sorted(ranks), "rank_pattern": ranks,
              "alpha_pattern": ranks, "lora_dropout": 0.0, "bias": "none", "use_rslora": False}  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


MERGE = [{"model": "support", "weight": 0.7}, {"model": "legal", "weight": 0.3}]


def test_merged_request_equals_one_stacked_peft_lora_in_transformers(server, adapter_dirs, model_dir, tmp_path):
    """Two members of different ranks and targets (one rsLoRA), 0.7/0.3: the greedy tokens of HF+peft on the
    hand-stacked PEFT LoRA; the chat endpoint takes the merge too."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    got = complete(client(server, "acme"), adapters=MERGE)
    oracle = stacked_peft_dir([(adapter_dirs["r8-rslora"], 0.7), (adapter_dirs["r4-qv"], 0.3)], tmp_path / "stacked")
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), oracle).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)[0, ids.shape[1]:]
    assert got == tok.decode(ref, skip_special_tokens=True)
    assert got != complete(client(server, "acme"), "support")  # the merge changes what the first member alone says
    chat = client(server, "acme").chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                                        temperature=0, extra_body={"adapters": MERGE})  # fmt: skip
    assert chat.model == "smollm2" and chat.choices[0].message.content


def test_merged_request_in_a_batch_with_plain_adapter_and_base_requests(server):
    acme = client(server, "acme")
    alone = {"merged": complete(acme, adapters=MERGE), "legal": complete(acme, "legal"), "base": complete(acme)}
    jobs = {"merged": lambda: complete(acme, adapters=list(reversed(MERGE))),  # the order of members does not matter
            "legal": lambda: complete(acme, "legal"), "base": lambda: complete(acme)}  # fmt: skip
    together, barrier = {}, threading.Barrier(len(jobs))

    def run(name):
        barrier.wait()
        together[name] = jobs[name]()

    threads = [threading.Thread(target=run, args=(n,)) for n in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_members_are_resolved_with_the_callers_rights(server):
    acme = client(server, "acme")
    with pytest.raises(openai.NotFoundError) as e:
        complete(acme, adapters=[{"model": "support"}, {"model": "globex/secret"}])  # another tenant's private adapter
    assert e.value.body["param"] == "adapters.1.model" and "globex/secret" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        complete(acme, adapters=[{"model": "nope"}])
    with pytest.raises(openai.NotFoundError):
        complete(client(server, "globex"), adapters=[{"model": "acme/support"}])
    assert complete(acme, adapters=[{"model": "support", "weight": 0.5}, {"model": "globex/shared", "weight": 0.5}])  # public: allowed


@pytest.mark.parametrize("body, param, words", [
    ({"adapters": [{"model": "support"}] * 9}, "adapters", "at most 8"),
    ({"adapters": []}, "adapters", "at least 1"),
    ({"adapters": [{"model": "support", "weight": 100.0}]}, "adapters.0.weight", "less than or equal"),
    ({"adapters": [{"model": "support", "weight": "1"}]}, "adapters.0.weight", "valid number"),
    ({"adapters": [{"model": "support"}], "merge_strategy": "ties"}, "merge_strategy", "not supported"),
    ({"adapters": [{"model": "support"}], "merge_strategy": "magic"}, "merge_strategy", "unknown"),
    ({"merge_strategy": "linear"}, "merge_strategy", "adapters"),
    ({"adapters": [{"model": "support"}, {"model": "dora"}]}, "adapters.1.model", "dora adapter"),
    ({"adapters": [{"model": "smollm2"}]}, "adapters.0.model", "not a registry adapter"),
    ({"adapters": [{"model": "wide"}, {"model": "legal"}]}, "adapters", "maximum LoRA rank 32"),  # q_proj: 32 + 4
])  # fmt: skip
def test_bad_merges_are_400s_that_say_why(server, body, param, words):
    r = httpx.post(server.base_url + "/v1/completions", headers={"Authorization": f"Bearer {server.keys['acme']}"},
                   json={"model": "smollm2", "prompt": PROMPT, "max_tokens": 2, **body})  # fmt: skip
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_non_finite_weight_and_model_other_than_the_base_are_400s(server):
    headers = {"Authorization": f"Bearer {server.keys['acme']}", "Content-Type": "application/json"}
    raw = '{"model": "smollm2", "prompt": "x", "max_tokens": 1, "adapters": [{"model": "support", "weight": 1e999}]}'
    r = httpx.post(server.base_url + "/v1/completions", headers=headers, content=raw)
    assert r.status_code == 400 and r.json()["error"]["param"] == "adapters.0.weight"
    r = httpx.post(server.base_url + "/v1/completions", headers=headers, json={"model": "support", "prompt": "x", "adapters": [{"model": "legal"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model" and "base model `smollm2`" in r.json()["error"]["message"]


def test_deleting_a_member_drops_its_stacks_from_every_tier(server, adapter_dirs):
    upload(server, "acme", "temp", files_of(adapter_dirs["r2-mlp"]))
    acme = client(server, "acme")
    complete(acme, adapters=[{"model": "temp", "weight": 0.5}, {"model": "legal", "weight": 0.5}])
    stacks = [k for k in server.engine.adapters.resident if k.startswith("stack:")]
    assert stacks and any(k in server.service.host for k in stacks)
    assert server.admin.delete("/admin/v1/adapters/acme/temp").status_code == 200
    remaining = [k for k in server.engine.adapters.resident if k.startswith("stack:")]
    kept = set(stacks) & set(remaining)
    assert len(kept) == len(stacks) - 1 and not any(k in server.service.host for k in set(stacks) - kept)
    with pytest.raises(openai.NotFoundError):
        complete(acme, adapters=[{"model": "temp"}, {"model": "legal"}])


# -- vLLM's runtime adapter endpoints -----------------------------------------------------------------------
def load(srv, headers=None, **body):
    return httpx.post(srv.base_url + "/v1/load_lora_adapter", json=body, headers=headers if headers is not None else srv.admin.headers)


def unload(srv, headers=None, **body):
    return httpx.post(srv.base_url + "/v1/unload_lora_adapter", json=body, headers=headers if headers is not None else srv.admin.headers)


def test_load_use_list_and_unload_like_vllm(server, adapter_dirs):
    path = str(adapter_dirs["r4-qv"])
    tenant = {"Authorization": f"Bearer {server.keys['acme']}"}
    assert load(server, headers={}, lora_name="sql", lora_path=path).status_code == 401
    assert load(server, headers=tenant, lora_name="sql", lora_path=path).status_code == 403
    assert unload(server, headers=tenant, lora_name="sql").status_code == 403
    r = load(server, lora_name="sql", lora_path=path)
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'sql' added successfully.")
    assert load(server, lora_name="sql", lora_path=path).status_code == 400  # already loaded
    assert load(server, lora_name="sql", lora_path=path, load_inplace=True).status_code == 200
    assert load(server, lora_name="smollm2", lora_path=path).status_code == 400  # the base model's name

    globex = client(server, "globex")
    assert complete(globex, "sql") == complete(client(server, "acme"), "legal")  # the same files, by bare name, for every tenant
    cards = {c.id: c for c in globex.models.list().data}
    assert (cards["sql"].parent, cards["sql"].root, cards["smollm2"].parent) == ("smollm2", "sql", None)
    assert cards["shared"].parent == "smollm2" if "shared" in cards else cards["globex/shared"].parent == "smollm2"
    admin_cards = {c.id: c for c in client(server, key=ADMIN).models.list().data}
    assert admin_cards["sql"].root == path

    r = unload(server, lora_name="sql")
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'sql' removed successfully.")
    with pytest.raises(openai.NotFoundError):
        complete(globex, "sql")
    r = unload(server, lora_name="sql")
    assert r.status_code == 404 and r.json()["error"]["message"] == "The lora adapter 'sql' cannot be found."


def test_bad_lora_paths_are_refused(server, adapter_dirs, tmp_path):
    missing = load(server, lora_name="x", lora_path=str(tmp_path / "missing"))
    assert missing.status_code == 404 and "No adapter found" in missing.json()["error"]["message"]  # vLLM's answer
    empty = tmp_path / "empty"
    empty.mkdir()
    escape = tmp_path / "escape"
    escape.mkdir()
    (escape / "adapter_config.json").write_bytes((adapter_dirs["r4-qv"] / "adapter_config.json").read_bytes())
    (escape / "adapter_model.safetensors").symlink_to(adapter_dirs["r4-qv"] / "adapter_model.safetensors")
    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_config.json").write_bytes((adapter_dirs["r4-qv"] / "adapter_config.json").read_bytes())
    with open(big / "adapter_model.safetensors", "wb") as f:
        f.truncate(MAX_ADAPTER_BYTES + 1)  # sparse: costs nothing
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    (fifo / "adapter_config.json").write_bytes((adapter_dirs["r4-qv"] / "adapter_config.json").read_bytes())
    os.mkfifo(fifo / "adapter_model.safetensors")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "adapter_config.json").write_text("{")
    (garbage / "adapter_model.safetensors").write_bytes(b"nope")
    for path, code in [(empty, "invalid_lora_path"), (escape, "unsafe_path"), (big, "adapter_too_large"), (fifo, "unsafe_path"),
                       (garbage, "invalid_adapter"), (adapter_dirs["r4-qv"] / "adapter_config.json", "invalid_lora_path")]:  # fmt: skip
        r = load(server, lora_name="x", lora_path=str(path))
        assert r.status_code == 400 and r.json()["error"]["code"] == code, (path, r.text)
    assert load(server, lora_name="Bad/Name", lora_path=str(adapter_dirs["r4-qv"])).status_code == 400
    assert load(server, lora_name="x", lora_path="").status_code == 400
    assert unload(server, lora_name="x").status_code == 404
