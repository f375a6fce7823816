"""Routed LoRA experts (MixLoRA top-k, LLaVA-MoLE top-1, MoLE sigmoid gates) equal a plain dense reference."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_save

from server.config import EngineConfig
from tests.conftest import greedy_outputs
from server.engine.sequence import SamplingParams, Sequence
from server.lora.peft import AdapterError, module_dims

E, R, R_ATTN, ALPHA = 4, 8, 4, 16
PROMPTS = ["The capital of France is", "def add(a, b):"]


def make_mixlora(cfg, routing: str, top_k: int, seed: int = 0) -> tuple[dict[str, bytes], dict]:
    g = torch.Generator().manual_seed(seed)
    t = {}
    for layer in range(cfg.num_layers):
        t[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = torch.randn(E, cfg.hidden_size, generator=g) * 0.5
        for module in ("gate_proj", "up_proj", "down_proj"):
            d_in, d_out = module_dims(cfg, module)
            for e in range(E):
                t[f"mixlora.layers.{layer}.mlp.{module}.experts.{e}.lora_A.weight"] = torch.randn(R, d_in, generator=g) / d_in**0.5
                t[f"mixlora.layers.{layer}.mlp.{module}.experts.{e}.lora_B.weight"] = torch.randn(d_out, R, generator=g) * 0.05
        for module in ("q_proj", "v_proj"):
            d_in, d_out = module_dims(cfg, module)
            t[f"mixlora.layers.{layer}.self_attn.{module}.lora_A.weight"] = torch.randn(R_ATTN, d_in, generator=g) / d_in**0.5
            t[f"mixlora.layers.{layer}.self_attn.{module}.lora_B.weight"] = torch.randn(d_out, R_ATTN, generator=g) * 0.05
    config = {"peft_type": "MIXLORA", "num_experts": E, "top_k": top_k, "r": R, "lora_alpha": ALPHA, "act_fn": "silu", "routing": routing}
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": safetensors_save(t)}, t


def write(files, path):
    path.mkdir()
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def reference_model(model_dir, t, routing, top_k):
    """HF model with attention LoRAs merged and every MLP replaced by a loop over experts with merged weights."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    s = ALPHA / R_ATTN
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            for module in ("q_proj", "v_proj"):
                lin = getattr(layer.self_attn, module)
                lin.weight += s * t[f"mixlora.layers.{i}.self_attn.{module}.lora_B.weight"] @ t[f"mixlora.layers.{i}.self_attn.{module}.lora_A.weight"]
            mlp = layer.mlp
            experts = []
            for e in range(E):
                merged = {}
                for module in ("gate_proj", "up_proj", "down_proj"):
                    delta = t[f"mixlora.layers.{i}.mlp.{module}.experts.{e}.lora_B.weight"] @ t[f"mixlora.layers.{i}.mlp.{module}.experts.{e}.lora_A.weight"]
                    merged[module] = getattr(mlp, module).weight + (ALPHA / R) * delta
                experts.append(merged)
            router = t[f"mixlora.layers.{i}.mlp.moe_gate.weight"]

            def forward(x, experts=experts, router=router):
                flat = x.reshape(-1, x.shape[-1])
                logits = flat @ router.T
                if routing == "sigmoid":
                    gates = torch.sigmoid(logits)
                else:
                    probs = logits.softmax(-1)
                    top, idx = probs.topk(top_k, -1)
                    gates = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
                out = torch.zeros_like(flat)
                for e, w in enumerate(experts):
                    y = (F.silu(flat @ w["gate_proj"].T) * (flat @ w["up_proj"].T)) @ w["down_proj"].T
                    out += gates[:, e : e + 1] * y
                return out.view_as(x)

            mlp.forward = forward
    return hf


@pytest.mark.parametrize("routing, top_k", [("top_k", 2), ("top_k", 1), ("sigmoid", E)], ids=["mixlora-top2", "llava-mole-top1", "mole-sigmoid"])
def test_routed_experts_equal_the_dense_reference(model_dir, tmp_path, routing, top_k):
    from server.engine.llm_engine import LLMEngine
    from server.models.config import ModelConfig

    files, tensors = make_mixlora(ModelConfig.from_dir(model_dir), routing, top_k)
    engine = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, adapters={"moe": write(files, tmp_path / "moe")}, kv_cache_tokens=2048))
    hf = reference_model(model_dir, tensors, routing, top_k)
    for prompt in PROMPTS:
        ids = engine.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
        seq = Sequence(ids[0].tolist(), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), "moe")
        engine.add(seq)
        while engine.has_work():
            engine.step()
        assert seq.output_token_ids == ref, prompt


def test_experts_lora_and_base_in_one_batch_equal_each_alone(model_dir, adapter_dirs, tmp_path):
    from server.engine.llm_engine import LLMEngine
    from server.models.config import ModelConfig

    files, _ = make_mixlora(ModelConfig.from_dir(model_dir), "top_k", 2, seed=1)
    files1, _ = make_mixlora(ModelConfig.from_dir(model_dir), "top_k", 1, seed=2)
    engine = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, kv_cache_tokens=4096, adapters={
        "moe": write(files, tmp_path / "moe"), "mole": write(files1, tmp_path / "mole"), "lora": adapter_dirs["r8-all"],
    }))
    jobs = [(p, a) for p in PROMPTS for a in ("moe", "lora", None, "mole")]

    def run(batch):
        return greedy_outputs(engine, batch, 8)

    assert run(jobs) == [run([j])[0] for j in jobs]


def test_malformed_mixlora_is_refused(model_dir):
    from server.families.moe import parse_mixlora
    from server.models.config import ModelConfig

    cfg = ModelConfig.from_dir(model_dir)
    files, t = make_mixlora(cfg, "top_k", 2)
    t["mixlora.layers.0.mlp.moe_gate.weight"] = torch.zeros(E + 1, cfg.hidden_size)
    with pytest.raises(AdapterError, match="moe_gate"):
        parse_mixlora({**files, "adapter_model.safetensors": safetensors_save(t)}, "m", cfg, torch.float32, 64)
    files, t = make_mixlora(cfg, "top_k", 2)
    del t["mixlora.layers.1.mlp.up_proj.experts.2.lora_B.weight"]
    with pytest.raises(AdapterError, match="pair"):
        parse_mixlora({**files, "adapter_model.safetensors": safetensors_save(t)}, "m", cfg, torch.float32, 64)
    bad_cfg = json.dumps({"peft_type": "MIXLORA", "num_experts": 2, "top_k": 3, "r": 8}).encode()
    with pytest.raises(AdapterError, match="top_k"):
        parse_mixlora({**files, "adapter_config.json": bad_cfg}, "m", cfg, torch.float32, 64)
