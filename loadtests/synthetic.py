"""Synthetic adapters of every family, as the files an upload would carry (random weights, seeded)."""
from __future__ import annotations

import json

import torch
from safetensors.torch import save as safetensors_save

from server.models.modules import module_dims, module_parent


def lora_files(cfg, g, rank=16, targets=("q_proj", "v_proj")):
    t = {}
    for layer in range(cfg.num_layers):
        for m in targets:
            d_in, d_out = module_dims(cfg, m)
            p = f"base_model.model.model.layers.{layer}.{module_parent(m)}.{m}"
            t[f"{p}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) / d_in**0.5
            t[f"{p}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.01
    cfg_json = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(targets)}
    return {"adapter_config.json": json.dumps(cfg_json).encode(), "adapter_model.safetensors": safetensors_save(t)}


def s2ft_files(cfg, g, fraction=0.03):
    t = {}
    for layer in range(cfg.num_layers):
        for m, kind in (("v_proj", "row"), ("up_proj", "row"), ("o_proj", "col"), ("down_proj", "col")):
            d_in, d_out = module_dims(cfg, m)
            n = d_out if kind == "row" else d_in
            k = max(1, int(n * fraction))
            idx = torch.randperm(n, generator=g)[:k].sort().values.to(torch.int32)
            p = f"model.layers.{layer}.{module_parent(m)}.{m}.s2_{kind}"
            t[f"{p}_indices"] = idx
            t[f"{p}_delta"] = torch.randn((k, d_in) if kind == "row" else (d_out, k), generator=g) * 0.01
    c = {"peft_type": "S2FT", "hotswap_family": "s2ft", "format_version": 1, "base_model_name_or_path": "bench",
         "target_modules": sorted(["v_proj", "up_proj", "o_proj", "down_proj"])}
    return {"adapter_config.json": json.dumps(c).encode(), "adapter_model.safetensors": safetensors_save(t)}


def reclora_files(cfg, g, k=8, rank=8, targets=("q_proj", "v_proj")):
    t = {}
    for layer in range(cfg.num_layers):
        for m in targets:
            d_in, d_out = module_dims(cfg, m)
            p = f"model.layers.{layer}.{module_parent(m)}.{m}"
            t[f"{p}.reclora_A"] = torch.randn(k, rank, d_in, generator=g) / d_in**0.5
            t[f"{p}.reclora_B"] = torch.randn(k, d_out, rank, generator=g) * 0.01
    c = {"peft_type": "RECLORA", "r": rank, "lora_alpha": rank, "num_meta_loras": k, "target_modules": list(targets)}
    return {"adapter_config.json": json.dumps(c).encode(), "adapter_model.safetensors": safetensors_save(t)}


def mixlora_files(cfg, g, experts=4, top_k=2, rank=8, routing="top_k", global_gates=False):
    """MixLoRA files; routing "sigmoid" with global_gates=True is MoLE (local sigmoid gates times per-sample global gates)."""
    t = {}
    for layer in range(cfg.num_layers):
        t[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = torch.randn(experts, cfg.hidden_size, generator=g) * 0.1
        if global_gates:
            t[f"mixlora.layers.{layer}.mlp.moe_global_gate.weight"] = torch.randn(experts, cfg.hidden_size, generator=g) * 0.1
            t[f"mixlora.layers.{layer}.mlp.moe_global_gate.bias"] = torch.randn(experts, generator=g) * 0.1
        for m in ("gate_proj", "up_proj", "down_proj"):
            d_in, d_out = module_dims(cfg, m)
            for e in range(experts):
                p = f"mixlora.layers.{layer}.mlp.{m}.experts.{e}"
                t[f"{p}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) / d_in**0.5
                t[f"{p}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.01
    c = {"peft_type": "MIXLORA", "num_experts": experts, "top_k": top_k, "r": rank, "lora_alpha": rank, "act_fn": "silu"}
    if routing != "top_k" or global_gates:
        c |= {"routing": routing, "global_gates": global_gates}
    return {"adapter_config.json": json.dumps(c).encode(), "adapter_model.safetensors": safetensors_save(t)}
