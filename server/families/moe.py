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
import torch.nn.functional as F

from kernels import make_lora_plan
from server.families.base import Family
from server.lora.config_schema import MixLoraConfig, brief
from server.lora.peft import CONFIG_FILE, WEIGHTS_FILE, AdapterError, cast_weight, load_tensors, parse_adapter_config
from server.models.modules import ATTN_MODULES, MLP_MODULES, module_dims
from server.models.config import ModelConfig

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
    space = "lora"  # attention LoRA rows, then each expert's rows (server.families.lora)

    @property
    def units(self) -> int:
        return self.attn_rank + self.num_experts * self.expert_rank

    @property
    def plan_units(self) -> int:
        """The step plan drives the attention LoRA only; experts are routed per layer (ExpertsStep)."""
        return self.attn_rank

    @property
    def targets(self) -> frozenset[str]:
        return frozenset(module for _, module in self.attn)

    def module_units(self) -> dict[str, int]:
        return {m: self.expert_rank if m in MLP_MODULES else self.attn_rank for _, m in self.modules}

    @property
    def modules(self) -> set[tuple[int, str]]:
        return set(self.attn) | {(layer, module) for layer, module, _ in self.experts}

    @property
    def num_bytes(self) -> int:
        tensors = [t for ab in (*self.attn.values(), *self.experts.values()) for t in ab] + list(self.routers.values())
        return sum(t.nbytes for t in tensors)

    def write_into(self, pools: dict[str, torch.Tensor], layer: int, module: str, start: int, dtype: torch.dtype) -> None:
        if module in ATTN_MODULES:
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


class ExpertsStep:
    """One routed-experts adapter in one step: after each layer's MLP, its tokens' outputs become
    Σ_e p_e · expert_e(h).

    Each (token, chosen expert) becomes a row; rows are sorted by expert so one segmented LoRA call
    per projection serves every expert. The base gate/up GEMMs are reused from `gate_up`."""

    def __init__(self, weights: MoELoraWeights, tokens: torch.Tensor, expert_row_start: int):
        self.weights, self.tokens = weights, tokens  # tokens: (n,) positions in the flat batch
        self.expert_row_start = expert_row_start  # expert e owns LoRA rows [start + e·r, start + (e+1)·r) of the MLP pools

    def after_mlp(self, layer, h: torch.Tensor, gate_up: torch.Tensor, out: torch.Tensor) -> None:
        w = self.weights
        if layer.layer_idx not in w.routers:
            return  # no experts in this layer: the base MLP stands
        tok = self.tokens
        experts, probs = w.route(layer.layer_idx, h[tok])  # (n, k)
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        rows = tok.repeat_interleave(experts.shape[1])[order]
        row_p = probs.reshape(-1)[order].to(h.dtype)
        counts = torch.bincount(flat, minlength=w.num_experts).tolist()
        indptr = [0]
        for c in counts:
            indptr.append(indptr[-1] + c)
        r = w.expert_rank
        plan = make_lora_plan(indptr, [self.expert_row_start + e * r for e in range(w.num_experts)], [r] * w.num_experts)
        hr = h[rows]
        gu = gate_up[rows]  # base (these tokens get no MLP delta from the step plan)
        gate_up_proj, down_proj = layer.gate_up_proj, layer.down_proj
        for slot in gate_up_proj.slots.values():
            if "lora_a" in slot.pools:
                gate_up_proj.kernels.sgmv_lora(gu[:, slot.out_start : slot.out_end], hr, slot.pools["lora_a"], slot.pools["lora_b"], plan)
        g, u = gu.split(layer.intermediate_size, dim=-1)
        act = F.silu(g) * u
        down = down_proj.base(act)
        slot = down_proj.slots["down_proj"]
        if "lora_a" in slot.pools:
            down_proj.kernels.sgmv_lora(down, act, slot.pools["lora_a"], slot.pools["lora_b"], plan)
        out.index_fill_(0, tok, 0)
        out.index_add_(0, rows, down * row_p.unsqueeze(1))


def _step_hook(entry, tokens: torch.Tensor) -> ExpertsStep:
    w = entry.weights
    return ExpertsStep(w, tokens, entry.row_start + w.attn_rank)


FAMILY = Family(
    "moe-lora", lambda tag: tag.names("moe-lora", "MIXLORA"),
    lambda files, name, ctx: parse_mixlora(files, name, ctx.model_cfg, ctx.dtype, ctx.max_rank),
    step_hook=_step_hook,
)
