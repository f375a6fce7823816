"""S²FT adapters end to end on the embedded model: converter round trip, outputs equal HF transformers
running the fine-tuned checkpoint, and S²FT + LoRA + base in one batch equal each served alone."""
from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from server.config import EngineConfig
from tests.conftest import greedy_outputs
from server.engine.sequence import SamplingParams, Sequence
from server.families.s2ft_convert import convert_s2ft

PROMPTS = ["The capital of France is", "Once upon a time", "def square(x):"]
# selected rows (v_proj, up_proj: output channels) and columns (o_proj, down_proj: input channels)
CHANGES = {("v_proj", "row"): 12, ("up_proj", "row"): 46, ("o_proj", "col"): 18, ("down_proj", "col"): 46}
LAYERS = (0, 3, 7, 15, 29)


@pytest.fixture(scope="module")
def s2ft_case(model_dir, tmp_path_factory):
    """A fine-tuned checkpoint with S²FT-style changes, and the adapter the converter makes from it."""
    root = tmp_path_factory.mktemp("s2ft")
    ft = root / "finetuned"
    shutil.copytree(model_dir, ft)
    weights = load_file(str(model_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for layer in LAYERS:
        for (module, kind), k in CHANGES.items():
            block = "mlp" if module in ("up_proj", "down_proj") else "self_attn"
            w = weights[f"model.layers.{layer}.{block}.{module}.weight"]
            if kind == "row":
                idx = torch.randperm(w.shape[0], generator=gen)[:k]
                w[idx, :] += 0.05 * torch.randn(k, w.shape[1], generator=gen)
            else:
                idx = torch.randperm(w.shape[1], generator=gen)[:k]
                w[:, idx] += 0.05 * torch.randn(w.shape[0], k, generator=gen)
    save_file(weights, str(ft / "model.safetensors"), metadata={"format": "pt"})
    adapter = root / "adapter"
    report = convert_s2ft(model_dir, ft, adapter)
    return ft, adapter, report


def test_converter_finds_the_changed_rows_and_columns(s2ft_case):
    _, adapter, report = s2ft_case
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "S2FT" and cfg["target_modules"] == sorted(m for m, _ in CHANGES)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    for layer in LAYERS:
        for (module, kind), k in CHANGES.items():
            block = "mlp" if module in ("up_proj", "down_proj") else "self_attn"
            idx = tensors[f"model.layers.{layer}.{block}.{module}.s2_{kind}_indices"]
            assert idx.dtype == torch.int32 and idx.numel() == k
    assert len(tensors) == 2 * len(LAYERS) * len(CHANGES)


def test_s2ft_adapter_reproduces_the_finetuned_model(s2ft_case, model_dir):
    """Greedy tokens of base + S²FT adapter equal HF transformers running the fine-tuned checkpoint."""
    from transformers import AutoModelForCausalLM

    from server.engine.llm_engine import LLMEngine

    ft, adapter, _ = s2ft_case
    engine = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, adapters={"s2": adapter}, kv_cache_tokens=2048))
    hf = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval()
    base_differs = False
    for prompt in PROMPTS:
        ids = engine.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
        seqs = [Sequence(ids[0].tolist(), SamplingParams(max_tokens=24, temperature=0.0), a) for a in ("s2", None)]
        for s in seqs:
            engine.add(s)
        while engine.has_work():
            engine.step()
        assert seqs[0].output_token_ids[: len(ref)] == ref, prompt
        base_differs |= seqs[1].output_token_ids != seqs[0].output_token_ids
    assert base_differs  # the deltas matter


def test_mixed_batch_of_s2ft_lora_and_base_equals_each_alone(s2ft_case, model_dir, adapter_dirs):
    from server.engine.llm_engine import LLMEngine

    _, adapter, _ = s2ft_case
    engine = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, adapters={"s2": adapter, "lora": adapter_dirs["r8-all"], "lora2": adapter_dirs["r4-qv"]}, kv_cache_tokens=4096))
    jobs = [(p, a) for p in PROMPTS for a in ("s2", "lora", None, "lora2")]

    def run(batch):
        return greedy_outputs(engine, batch, 12)

    together = run(jobs)
    assert together == [run([job])[0] for job in jobs]


def test_s2ft_upload_is_detected_and_served(s2ft_case, model_dir, tmp_path):
    from server.adapters.service import build_adapter_service
    from server.api.app import build_app
    from server.engine.llm_engine import LLMEngine
    from tests.conftest import LiveServer

    _, adapter, _ = s2ft_case
    engine = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, kv_cache_tokens=2048))
    service = build_adapter_service(engine, str(tmp_path / "store"), None, tmp_path / "cache", 1 << 30, 1 << 30)
    with LiveServer(build_app(engine, adapter_service=service)) as srv:
        c = httpx.Client(base_url=srv.base_url, timeout=60)
        assert c.post("/admin/v1/tenants", json={"name": "t"}).status_code == 201
        files = {n: (n, (adapter / n).read_bytes()) for n in ("adapter_config.json", "adapter_model.safetensors")}
        r = c.post("/admin/v1/adapters", data={"tenant": "t", "name": "s2"}, files=files)
        assert r.status_code == 201, r.text
        assert r.json()["family"] == "s2ft" and r.json()["ranks"]["up_proj"] == 46
        r = c.post("/admin/v1/adapters", data={"tenant": "t", "name": "s2-as-lora", "family": "lora"}, files=files)
        assert r.status_code == 400 and "s2ft" in r.json()["error"]["message"]
        out = c.post("/v1/completions", json={"model": "t/s2", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] >= 1
        bad = dict(files)
        bad["adapter_model.safetensors"] = ("adapter_model.safetensors", b"\x00" * 64)
        r = c.post("/admin/v1/adapters", data={"tenant": "t", "name": "broken"}, files=bad)
        assert r.status_code == 400
