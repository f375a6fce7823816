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
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load

from server.lora.peft import CONFIG_FILE, WEIGHTS_FILE, AdapterError, module_dims, parse_adapter_config
from server.models.config import ModelConfig

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
_EXPERT = re.compile(r"^mixlora\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.experts\.(\d+)\.lora_([AB])\.weight$")
_ATTN = re.compile(r"^mixlora\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.lora_([AB])\.weight$")
_ROUTER = re.compile(r"^mixlora\.layers\.(\d+)\.mlp\.moe_gate\.weight$")


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
    cfg = parse_adapter_config(files[CONFIG_FILE], name)
    try:
        num_experts, top_k, r = int(cfg["num_experts"]), int(cfg.get("top_k", 2)), int(cfg["r"])
        alpha = float(cfg.get("lora_alpha", r))
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"{name}: {CONFIG_FILE} needs integer `num_experts` and `r`") from None
    routing = cfg.get("routing", "top_k")
    if routing not in ("top_k", "sigmoid") or not (1 <= top_k <= num_experts) or cfg.get("act_fn", "silu") != "silu":
        raise AdapterError(f"{name}: need routing top_k|sigmoid, 1 <= top_k <= num_experts, act_fn silu")
    if not (0 < r <= max_rank):
        raise AdapterError(f"{name}: rank {r} must lie in 1..--max-lora-rank {max_rank}")
    try:
        tensors = safetensors_load(files[WEIGHTS_FILE])
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{name}: {WEIGHTS_FILE} is not a readable safetensors file ({e})") from None
    out = MoELoraWeights(name, num_experts, top_k, routing, r, 0, alpha, bool(cfg.get("use_rslora")))
    pairs: dict[tuple, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if m := _ROUTER.match(key):
            layer = int(m.group(1))
            if t.shape != (num_experts, model_cfg.hidden_size):
                raise AdapterError(f"{name}: {key} must be ({num_experts}, {model_cfg.hidden_size}), got {tuple(t.shape)}")
            out.routers[layer] = t.to(dtype)
        elif m := _EXPERT.match(key):
            pairs.setdefault(("mlp", int(m.group(1)), m.group(2), int(m.group(3))), {})[m.group(4)] = t
        elif m := _ATTN.match(key):
            pairs.setdefault(("attn", int(m.group(1)), m.group(2)), {})[m.group(3)] = t
        else:
            raise AdapterError(f"{name}: unexpected tensor {key!r} in a MixLoRA adapter")
    for key, ab in sorted(pairs.items()):
        layer, module = key[1], key[2]
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{name}: {key} lacks its lora_A/lora_B pair")
        if layer >= model_cfg.num_layers:
            raise AdapterError(f"{name}: layer {layer} is beyond the base model's {model_cfg.num_layers}")
        d_in, d_out = module_dims(model_cfg, module)
        a, b = ab["A"], ab["B"]
        rk = a.shape[0]
        if a.shape != (rk, d_in) or b.shape != (d_out, rk) or rk > max_rank:
            raise AdapterError(f"{name}: {key} has A {tuple(a.shape)}, B {tuple(b.shape)}; need A (r, {d_in}), B ({d_out}, r), r <= {max_rank}")
        if key[0] == "mlp":
            if key[3] >= num_experts or rk != r:
                raise AdapterError(f"{name}: expert {key[3]} of layer {layer} {module} must have rank {r} and index < {num_experts}")
            if layer not in out.routers and layer not in {int(m.group(1)) for k in tensors if (m := _ROUTER.match(k))}:
                raise AdapterError(f"{name}: layer {layer} has experts but no moe_gate router")
            out.experts[(layer, module, key[3])] = (a.to(dtype), b.to(dtype))
        else:
            out.attn[(layer, module)] = (a.to(dtype), b.to(dtype))
            out.attn_rank = max(out.attn_rank, rk)
    if not out.experts:
        raise AdapterError(f"{name}: no expert weights")
    return out
