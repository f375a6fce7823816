"""Prefix caching through the real HTTP server and the registry: every family gives the tokens it gives
without caching, a second request over a shared system prompt reuses the first one's blocks, and
blocks never cross adapters, versions of one name, or states of one RecLoRA user."""
from __future__ import annotations

import httpx
import openai
import pytest
import torch

from loadtests.synthetic import s2ft_files
from server.models.config import ModelConfig
from tests.test_all_families import _upload
from tests.test_moe_lora import make_mixlora
from tests.test_reclora import make_reclora

SYSTEM = ("You are the assistant of a bicycle shop in Lyon. Answer in one short sentence, be polite, "
          "never invent prices, and point customers to the workshop for repairs. ")
QUESTIONS = ["Q: Do you sell helmets? A:", "Q: When do you open on Sunday? A:"]
# (model, user): every family, and whether its sequences may share blocks (routed experts keep
# per-sequence router state that a cached prefix would skip)
JOBS = [("base", None, True), ("t/lora", None, True), ("t/s2", None, True), ("t/moe", None, False),
        ("t/rec", "alice", True), ("t/sg", None, True)]


def _lora_files(adapter_dirs, key):
    return {n: (adapter_dirs[key] / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.fixture(scope="module")
def server(model_dir, adapter_dirs, tmp_path_factory):
    from server.adapters.service import build_adapter_service
    from server.api.app import build_app
    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from tests.conftest import LiveServer

    tmp = tmp_path_factory.mktemp("prefix")
    cfg = ModelConfig.from_dir(model_dir)
    engine = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, kv_cache_tokens=8192, served_model_name="base"))
    service = build_adapter_service(engine, str(tmp / "store"), None, tmp / "cache", 1 << 30, 1 << 30)
    with LiveServer(build_app(engine, adapter_service=service)) as srv:
        http = httpx.Client(base_url=srv.base_url, timeout=120)
        assert http.post("/admin/v1/tenants", json={"name": "t"}).status_code == 201
        _upload(http, "lora", _lora_files(adapter_dirs, "r8-all"), description="answer customer support questions")
        _upload(http, "lora2", _lora_files(adapter_dirs, "r16-attn"), description="write Python code")
        _upload(http, "s2", s2ft_files(cfg, torch.Generator().manual_seed(0), fraction=0.05))
        _upload(http, "moe", make_mixlora(cfg, "top_k", 2)[0])
        _upload(http, "rec", make_reclora(cfg)[0])
        assert http.put("/admin/v1/adapters/t/rec/users/alice", json={"weights": [0.7, 0.1, 0.1, 0.1]}).status_code == 200
        r = http.post("/admin/v1/adapters:generate", json={"tenant": "t", "name": "sg", "description": "help customers write Python", "top_k": 2})
        assert r.status_code == 201, r.text
        srv.http, srv.engine, srv.store_root = http, engine, tmp / "store"
        srv.client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
        yield srv


def complete(srv, model, user, prompt) -> str:
    kwargs = {"user": user} if user else {}
    out = srv.client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}, **kwargs)
    return out.choices[0].text


class caching_off:
    """The engine computes every prompt in full while inside (the server is idle between requests)."""

    def __init__(self, srv):
        self.blocks = srv.engine.block_manager

    def __enter__(self):
        self.blocks.enable_prefix_caching = False

    def __exit__(self, *exc):
        self.blocks.enable_prefix_caching = True


def hits_of(srv, model, user, prompt) -> tuple[str, int]:
    """The completion and how many prompt tokens it took from the prefix cache."""
    before = srv.engine.block_manager.hit_tokens
    text = complete(srv, model, user, prompt)
    return text, srv.engine.block_manager.hit_tokens - before


def test_every_family_gives_its_uncached_tokens_and_a_second_request_reuses_the_system_prompt(server):
    prompts = [SYSTEM + q for q in QUESTIONS]
    with caching_off(server):
        expected = {(m, u): [complete(server, m, u, p) for p in prompts] for m, u, _ in JOBS}
    system_tokens = len(server.engine.tokenizer(SYSTEM)["input_ids"])
    block = server.engine.block_manager.block_size
    for model, user, shares in JOBS:
        first, first_hits = hits_of(server, model, user, prompts[0])
        second, second_hits = hits_of(server, model, user, prompts[1])
        assert [first, second] == expected[(model, user)], model
        assert first_hits == 0, model
        if shares:
            assert second_hits >= system_tokens // block * block - block > 0, model
        else:
            assert second_hits == 0, model
    text = httpx.get(server.base_url + "/metrics").text
    assert "hotswap_prefix_cache_hit_tokens_total" in text


def test_two_adapters_never_share_blocks(server):
    prompt = "Adapters apart. " + SYSTEM + QUESTIONS[0]
    complete(server, "t/lora", None, prompt)
    assert hits_of(server, "t/lora2", None, prompt)[1] == 0
    assert hits_of(server, "base", None, prompt)[1] == 0
    assert hits_of(server, "t/lora", None, prompt)[1] > 0


def test_a_new_version_never_reuses_the_old_versions_blocks(server, adapter_dirs):
    prompt = "Versions apart. " + SYSTEM + QUESTIONS[1]
    _upload(server.http, "ver", _lora_files(adapter_dirs, "r8-all"))
    complete(server, "t/ver", None, prompt)
    assert hits_of(server, "t/ver", None, prompt)[1] > 0
    _upload(server.http, "ver", _lora_files(adapter_dirs, "r16-attn"), new_version="true")
    text, hits = hits_of(server, "t/ver", None, prompt)
    assert hits == 0
    with caching_off(server):
        assert text == complete(server, "t/ver", None, prompt) == complete(server, "t/lora2", None, prompt)


def test_a_new_user_state_never_reuses_the_old_states_blocks(server):
    prompt = "States apart. " + SYSTEM + QUESTIONS[0]
    complete(server, "t/rec", "alice", prompt)
    assert hits_of(server, "t/rec", "alice", prompt)[1] > 0
    assert hits_of(server, "t/rec", "bob", prompt)[1] == 0  # another user (another state) shares nothing
    assert server.http.put("/admin/v1/adapters/t/rec/users/alice", json={"weights": [0.1, 0.1, 0.1, 0.7]}).status_code == 200
    text, hits = hits_of(server, "t/rec", "alice", prompt)
    assert hits == 0
    with caching_off(server):
        assert text == complete(server, "t/rec", "alice", prompt)


def test_a_name_deleted_and_uploaded_again_serves_its_new_contents(server, adapter_dirs, model_dir):
    """v1 again after a delete: neither the host tier, the device pools nor RecLoRA's per-user copies
    may answer with the old contents under the reused key."""
    http, prompt = server.http, "Uploaded again. " + QUESTIONS[0]
    cfg = ModelConfig.from_dir(model_dir)
    _upload(http, "again", _lora_files(adapter_dirs, "r8-all"))
    assert complete(server, "t/again", None, prompt) == complete(server, "t/lora", None, prompt)
    assert http.delete("/admin/v1/adapters/t/again").status_code == 200
    _upload(http, "again", _lora_files(adapter_dirs, "r16-attn"))  # v1 once more, other contents
    assert complete(server, "t/again", None, prompt) == complete(server, "t/lora2", None, prompt)

    state = {"weights": [0.4, 0.3, 0.2, 0.1]}
    _upload(http, "rec-again", make_reclora(cfg, seed=0)[0])
    _upload(http, "rec-other", make_reclora(cfg, seed=1)[0])
    for name in ("rec-again", "rec-other"):
        assert http.put(f"/admin/v1/adapters/t/{name}/users/carol", json=state).status_code == 200
    old = complete(server, "t/rec-again", "carol", prompt)
    assert http.delete("/admin/v1/adapters/t/rec-again").status_code == 200
    _upload(http, "rec-again", make_reclora(cfg, seed=1)[0])
    assert http.put("/admin/v1/adapters/t/rec-again/users/carol", json=state).status_code == 200
    new = complete(server, "t/rec-again", "carol", prompt)
    assert new == complete(server, "t/rec-other", "carol", prompt) != old
