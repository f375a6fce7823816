"""Routed LoRA experts: MixLoRA (softmax -> top-k -> renormalise), LLaVA-MoLE (top-1), MoLE-style
soft sigmoid gates. Experts sit on the MLP projections; attention keeps a plain LoRA if present.

Each expert e is the base MLP with its own LoRA on gate/up/down:
    out(x) = Σ_e p_e(x) · [ (silu(g(x) + ΔG_e x) ⊙ (u(x) + ΔU_e x)) Wdᵀ + ΔD_e(·) ]
The base gate/up GEMMs run once for every token; the down projection runs once per (token, expert).

Layout in the LoRA row pools (one resident range of r_attn + E·r rows): the attention LoRA takes
rows [start, start + r_attn) of the attention pools (so the step's ordinary LoRA plan applies it,
and those rows are zero in the MLP pools); expert e takes rows [start + r_attn + e·r, … + r) of
the MLP pools, driven by a per-layer plan built from the router's choices.

Files: MixLoRA's public PEFT-style format — `adapter_config.json` `{"peft_type": "MIXLORA",
"num_experts", "top_k", "r", "lora_alpha", "act_fn": "silu", "routing": "top_k" | "sigmoid"
(hotswap extension, default top_k)}` and `adapter_model.safetensors` with
`mixlora.layers.{l}.mlp.moe_gate.weight` (E, d), `mixlora.layers.{l}.mlp.{gate,up,down}_proj.experts.{e}.lora_{A,B}.weight`
and optionally `mixlora.layers.{l}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from server.lora.config_schema import MixLoraConfig, brief
from server.lora.peft import CONFIG_FILE, WEIGHTS_FILE, AdapterError, cast_weight, load_tensors, module_dims, parse_adapter_config
from server.models.config import ModelConfig

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# [0-9]{1,9}, not \d+: int() of a Unicode digit or of thousands of digits must never be reached
_EXPERT = re.compile(r"^mixlora\.layers\.([0-9]{1,9})\.mlp\.(gate_proj|up_proj|down_proj)\.experts\.([0-9]{1,9})\.lora_([AB])\.weight$")
_ATTN = re.compile(r"^mixlora\.layers\.([0-9]{1,9})\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.lora_([AB])\.weight$")
_ROUTER = re.compile(r"^mixlora\.layers\.([0-9]{1,9})\.mlp\.moe_gate\.weight$")


@dataclass(slots=True)
class MoELoraWeights:
    name: str
    num_experts: int
    top_k: int
    routing: str  # "top_k" (softmax, top-k, renormalise; top_k=1 is LLaVA-MoLE) or "sigmoid" (every expert, σ gates)
    expert_rank: int
    attn_rank: int
    alpha: float
    rslora: bool = False
    routers: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (E, d)
    attn: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (A, B)
    experts: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    family = "moe-lora"

    @property
    def units(self) -> int:
        return self.attn_rank + self.num_experts * self.expert_rank

    @property
    def modules(self) -> set[tuple[int, str]]:
        return set(self.attn) | {(layer, module) for layer, module, _ in self.experts}

    @property
    def num_bytes(self) -> int:
        tensors = [t for ab in (*self.attn.values(), *self.experts.values()) for t in ab] + list(self.routers.values())
        return sum(t.nbytes for t in tensors)

    def write_into(self, pools: dict[str, torch.Tensor], layer: int, module: str, start: int, dtype: torch.dtype) -> None:
        if module in ATTN:
            a, b = self.attn[(layer, module)]
            blocks = [(start, a, b)]
        else:
            base = start + self.attn_rank
            blocks = [(base + e * self.expert_rank, *self.experts[(layer, module, e)]) for e in range(self.num_experts) if (layer, module, e) in self.experts]
        for row, a, b in blocks:
            r = a.shape[0]
            pools["lora_a"][row : row + r] = a
            pools["lora_b"][row : row + r] = (b.float().T * self.scale(r)).to(dtype)

    def scale(self, rank: int) -> float:
        """PEFT's scale for a LoRA of this rank: alpha / r (alpha / √r with rsLoRA)."""
        return self.alpha / math.sqrt(rank) if self.rslora else self.alpha / rank

    def route(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(experts (n, k), weights (n, k)) for hidden states h (n, d) entering this layer's MLP."""
        logits = h.float() @ self.routers[layer].float().T  # (n, E)
        if self.routing == "sigmoid":
            experts = torch.arange(self.num_experts).expand(h.shape[0], -1)
            return experts, torch.sigmoid(logits)
        probs = logits.softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return experts, weights / weights.sum(-1, keepdim=True)


def parse_mixlora(files: dict[str, bytes], name: str, model_cfg: ModelConfig, dtype: torch.dtype, max_rank: int) -> MoELoraWeights:
    if CONFIG_FILE not in files or WEIGHTS_FILE not in files:
        raise AdapterError(f"{name}: a MixLoRA adapter needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg = parse_adapter_config(files[CONFIG_FILE], name, MixLoraConfig, max_rank)
    num_experts, r = cfg.num_experts, cfg.r
    if cfg.top_k > num_experts:
        raise AdapterError(f"{name}: top_k {cfg.top_k} must lie in 1..num_experts ({num_experts})")
    tensors = load_tensors(files[WEIGHTS_FILE], name)
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else float(r)
    out = MoELoraWeights(name, num_experts, cfg.top_k, cfg.routing, r, 0, alpha, bool(cfg.use_rslora))
    pairs: dict[tuple, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if m := _ROUTER.match(key):
            layer = int(m.group(1))
            if layer >= model_cfg.num_layers:
                raise AdapterError(f"{name}: {key} addresses layer {layer} but the base model has {model_cfg.num_layers}")
            if layer in out.routers:
                raise AdapterError(f"{name}: two tensors hold the moe_gate router of layer {layer} (the second is {key})")
            if t.shape != (num_experts, model_cfg.hidden_size) or not t.is_floating_point():
                raise AdapterError(f"{name}: {key} must be floating point ({num_experts}, {model_cfg.hidden_size}), got {t.dtype} {tuple(t.shape)}")
            out.routers[layer] = cast_weight(t, dtype, f"{name}: {key}")
            continue
        if m := _EXPERT.match(key):
            slot, which = ("mlp", int(m.group(1)), m.group(2), int(m.group(3))), m.group(4)
        elif m := _ATTN.match(key):
            slot, which = ("attn", int(m.group(1)), m.group(2)), m.group(3)
        else:
            raise AdapterError(f"{name}: unexpected tensor {brief(key)} in a MixLoRA adapter")
        pair = pairs.setdefault(slot, {})
        if which in pair:  # "layers.1" and "layers.01" both name layer 1: which one would be served?
            raise AdapterError(f"{name}: two tensors hold the same lora_{which}: the second is {key}")
        pair[which] = t
    for key, ab in sorted(pairs.items()):
        layer, module = key[1], key[2]
        what = f"{name}: layer {layer} {module}" + (f" expert {key[3]}" if key[0] == "mlp" else "")
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{what} lacks its lora_A/lora_B pair")
        if layer >= model_cfg.num_layers:
            raise AdapterError(f"{name}: layer {layer} is beyond the base model's {model_cfg.num_layers}")
        d_in, d_out = module_dims(model_cfg, module)
        a, b = ab["A"], ab["B"]
        rk = a.shape[0] if a.dim() == 2 else 0
        if a.shape != (rk, d_in) or b.shape != (d_out, rk) or not 1 <= rk <= max_rank or not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(
                f"{what} has A {a.dtype} {tuple(a.shape)}, B {b.dtype} {tuple(b.shape)}; "
                f"need floating point A (r, {d_in}), B ({d_out}, r), 1 <= r <= {max_rank}"
            )
        if key[0] == "mlp":
            if key[3] >= num_experts or rk != r:
                raise AdapterError(f"{name}: expert {key[3]} of layer {layer} {module} must have rank {r} and index < {num_experts}")
            if layer not in out.routers:
                raise AdapterError(f"{name}: layer {layer} has experts but no moe_gate router")
            out.experts[(layer, module, key[3])] = (cast_weight(a, dtype, f"{what} lora_A"), cast_weight(b, dtype, f"{what} lora_B", out.scale(rk)))
        else:
            out.attn[(layer, module)] = (cast_weight(a, dtype, f"{what} lora_A"), cast_weight(b, dtype, f"{what} lora_B", out.scale(rk)))
            out.attn_rank = max(out.attn_rank, rk)
    if not out.experts:
        raise AdapterError(f"{name}: no expert weights")
    return out
