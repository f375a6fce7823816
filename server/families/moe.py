"""Routed LoRA experts: MixLoRA (softmax -> top-k -> renormalise), LLaVA-MoLE (top-1), MoLE's soft
sigmoid gates, optionally with MoLE's per-sample global gates. Experts sit on the MLP projections;
attention keeps a plain LoRA if present.

Each expert e is the base MLP with its own LoRA on gate/up/down; per token x (the MLP's input):
    out(x) = Σ_e p_e(x) · [ a_e(x) W_dᵀ + ΔD_e(a_e(x)) ],   a_e(x) = silu(g(x) + ΔG_e x) ⊙ (u(x) + ΔU_e x)
Routing weights p (zero for experts a token is not routed to), from the router logits l = x W_rᵀ:
    routing "top_k":   p = renormalised top-k of softmax(l)         (MixLoRA k = 2; LLaVA-MoLE k = 1)
    routing "sigmoid": p_e = σ(l_e)                                   (MoLE's local, per-token gates)
    + "global_gates":  p_e = σ(l_e) · σ(x̄ W_gᵀ + b_g)_e               (MoLE's global, per-sample gates)

The per-sample input x̄ of a causal LM. MoLE pools the whole sample (every token of the image); a
language model's sample is still being written while it is served, and a token's output may only
depend on what comes before it: otherwise the hidden states (and KV cache) of earlier tokens would
change as the sequence grows, and a prompt could not be prefilled in chunks. So x̄ at position t is
the causal running mean of this layer's MLP inputs over the sequence's tokens 0..t (prompt and
generated tokens alike):
    x̄_t = (1 / (t + 1)) Σ_{s <= t} x_s
x is the same input the router sees (the layer's post-attention RMSNorm output); for a finished
sequence of length L, x̄_{L-1} is MoLE's mean pool over the whole sample. It is what a dense model
computes with a cumulative mean over the sequence axis, it is the same whether the prompt is
prefilled at once, in chunks or recomputed after preemption, and it does not depend on the other
sequences of a batch. (The prompt's mean instead would not be causal within the prompt — a chunk's
outputs would depend on later chunks, so chunked prefill would need a separate pooling pass over
the whole prompt first — and it would freeze the global gates while the answer is generated.) Serving keeps, per sequence and layer, the running sum of
x over the tokens computed so far (float64: exact for float32 inputs while a sum stays within 2^29 of
its inputs' magnitudes, else within float64 rounding, ~1e-16 relative; so chunking does not
change them), in the sequence's hook state (SeqRows.state: ~d·8 bytes per layer), committed when a
step completes and dropped when the sequence finishes, fails, is aborted or is preempted (its
recompute starts again from position 0).

Serving (ExpertsStep, per layer, tensor ops only: no host sync, no per-layer Python planning):
- one GEMM gives the router logits and every expert's gate and up shrinks (x [W_r; A_G; A_U]ᵀ);
- kernels.routed_experts expands them (base g, u as the accumulator), evaluates every routed
  expert's activation and mixes them, Σ_e p_e a_e, into the MLP's activation before the down
  projection (hook point before_down): the model's own down GEMM then computes (Σ_e p_e a_e) W_dᵀ
  once per token — the down projection is linear, so this is Σ_e p_e a_e W_dᵀ;
- the down LoRA's shrinks, weighted, z = Σ_e p_e a_e A_D,eᵀ, are expanded once after it: out += z B_D
  (plus (Σ_e p_e - 1)·b_d when the base down projection has a bias and the weights do not sum to 1).

Layout in the LoRA row pools (one resident range of r_attn + E·r rows): the attention LoRA takes
rows [start, start + r_attn) of the attention pools (so the step's ordinary LoRA plan applies it,
and those rows are zero in the MLP pools); expert e takes rows [start + r_attn + e·r, … + r) of
the MLP pools.

Files: MixLoRA's public PEFT-style format — `adapter_config.json` `{"peft_type": "MIXLORA",
"num_experts", "top_k", "r", "lora_alpha", "act_fn": "silu", "routing": "top_k" | "sigmoid"
(hotswap extension, default top_k), "global_gates": false | true (hotswap extension, default false;
true needs "routing": "sigmoid")}` and `adapter_model.safetensors` with
`mixlora.layers.{l}.mlp.moe_gate.weight` (E, d), `mixlora.layers.{l}.mlp.{gate,up,down}_proj.experts.{e}.lora_{A,B}.weight`,
with global gates `mixlora.layers.{l}.mlp.moe_global_gate.weight` (E, d) and optionally `….bias` (E,) in
every layer that has a router (and only there), and optionally
`mixlora.layers.{l}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from kernels.experts import TOPK_MIN_TOKENS, segment_running_sums, segment_running_sums_reference
from server.families.base import Family, HookedAdapter, SeqRows, StepHook
from server.lora.config_schema import MixLoraConfig, brief
from server.lora.peft import CONFIG_FILE, WEIGHTS_FILE, AdapterError, cast_weight, load_tensors, parse_adapter_config
from server.models.modules import ATTN_MODULES, MLP_MODULES, module_dims
from server.models.config import ModelConfig

# [0-9]{1,9}, not \d+: int() of a Unicode digit or of thousands of digits must never be reached
_EXPERT = re.compile(r"^mixlora\.layers\.([0-9]{1,9})\.mlp\.(gate_proj|up_proj|down_proj)\.experts\.([0-9]{1,9})\.lora_([AB])\.weight$")
_ATTN = re.compile(r"^mixlora\.layers\.([0-9]{1,9})\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.lora_([AB])\.weight$")
_ROUTER = re.compile(r"^mixlora\.layers\.([0-9]{1,9})\.mlp\.moe_gate\.weight$")
_GLOBAL = re.compile(r"^mixlora\.layers\.([0-9]{1,9})\.mlp\.moe_global_gate\.(weight|bias)$")


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
    # MoLE's global gates, layer -> (W_g (E, d), b_g (E,) or None); empty unless the config says global_gates
    global_gates: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    attn: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (A, B)
    experts: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # layer -> (router, key, [W_r; A_G; A_U] rows): ExpertsStep's fused shrink weights, copied from the router and
    # the pool rows while both stay what they were (key: pool row addresses and version counters)
    fronts: dict = field(default_factory=dict, repr=False, compare=False)
    # (dtype, (layer, module) -> pool -> rows): its pool rows laid out in pinned host memory, kept by the
    # adapter manager on CUDA so the next load is one copy (server.lora.manager)
    host_rows: tuple | None = field(default=None, repr=False, compare=False)
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
        tensors = [t for ab in (*self.attn.values(), *self.experts.values(), *self.global_gates.values()) for t in ab if t is not None]
        return sum(t.nbytes for t in tensors + list(self.routers.values()))

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

    def on_device(self, device: torch.device) -> "MoELoraWeights":
        """What the step hooks read every step (routers, global gates), on the engine's device; the
        expert and attention LoRAs are in the pools already."""
        if all(t.device == device for t in self.routers.values()):
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, routers={k: move(t) for k, t in self.routers.items()},
                       global_gates={k: (move(w), move(b)) for k, (w, b) in self.global_gates.items()}, fronts={}, host_rows=None)

    def scale(self, rank: int) -> float:
        """PEFT's scale for a LoRA of this rank: alpha / r (alpha / √r with rsLoRA)."""
        return self.alpha / math.sqrt(rank) if self.rslora else self.alpha / rank

    def route(self, layer: int, h: torch.Tensor, pooled: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(experts (n, k), weights (n, k)) for hidden states h (n, d) entering this layer's MLP, readably:
        softmax, top-k, renormalise; with sigmoid routing every expert in order (experts None, weights
        (n, E)), times the global gates of `pooled` (n, d: each token's causal mean input, see the module
        docstring) if the adapter has them. (ExpertsStep._route is the serving path.)"""
        logits = h.float() @ self.routers[layer].float().T  # (n, E)
        if self.routing == "sigmoid":
            return None, self._global_gated(layer, torch.sigmoid(logits), pooled)
        probs = logits.softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return experts, weights / weights.sum(-1, keepdim=True)

    def _global_gated(self, layer: int, gates: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        """MoLE: the local gates times σ(x̄ W_gᵀ + b_g), x̄ = pooled (the layer's causal mean input)."""
        if layer not in self.global_gates:
            return gates
        w_g, b_g = self.global_gates[layer]
        g = torch.addmm(b_g.float(), pooled.float(), w_g.float().T) if b_g is not None else pooled.float() @ w_g.float().T
        return gates * torch.sigmoid(g).to(gates.dtype)


def parse_mixlora(files: dict[str, bytes], name: str, model_cfg: ModelConfig, dtype: torch.dtype, max_rank: int) -> MoELoraWeights:
    if CONFIG_FILE not in files or WEIGHTS_FILE not in files:
        raise AdapterError(f"{name}: a MixLoRA adapter needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg = parse_adapter_config(files[CONFIG_FILE], name, MixLoraConfig, max_rank)
    num_experts, r = cfg.num_experts, cfg.r
    if cfg.top_k > num_experts:
        raise AdapterError(f"{name}: top_k {cfg.top_k} must lie in 1..num_experts ({num_experts})")
    if cfg.global_gates and cfg.routing != "sigmoid":
        raise AdapterError(f"{name}: global_gates (MoLE's per-sample gates) need \"routing\": \"sigmoid\", not {cfg.routing!r}")
    tensors = load_tensors(files[WEIGHTS_FILE], name)
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else float(r)
    out = MoELoraWeights(name, num_experts, cfg.top_k, cfg.routing, r, 0, alpha, bool(cfg.use_rslora))
    pairs: dict[tuple, dict[str, torch.Tensor]] = {}
    global_parts: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if m := _GLOBAL.match(key):
            layer, which = int(m.group(1)), m.group(2)
            if not cfg.global_gates:
                raise AdapterError(f"{name}: {key} is a global gate but the config does not set \"global_gates\": true")
            if layer >= model_cfg.num_layers:
                raise AdapterError(f"{name}: {key} addresses layer {layer} but the base model has {model_cfg.num_layers}")
            part = global_parts.setdefault(layer, {})
            if which in part:
                raise AdapterError(f"{name}: two tensors hold the moe_global_gate {which} of layer {layer} (the second is {key})")
            shape = (num_experts, model_cfg.hidden_size) if which == "weight" else (num_experts,)
            if t.shape != shape or not t.is_floating_point():
                raise AdapterError(f"{name}: {key} must be floating point {shape}, got {t.dtype} {tuple(t.shape)}")
            part[which] = cast_weight(t, dtype, f"{name}: {key}")
            continue
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
    if cfg.global_gates:
        for layer in sorted(set(global_parts) | set(out.routers)):
            part = global_parts.get(layer, {})
            if layer not in out.routers:
                raise AdapterError(f"{name}: layer {layer} has a moe_global_gate but no moe_gate router")
            if "weight" not in part:
                raise AdapterError(f"{name}: layer {layer} has a router but no mixlora.layers.{layer}.mlp.moe_global_gate.weight (global_gates is set)")
            out.global_gates[layer] = (part["weight"], part.get("bias"))
    return out


class _ExpertRows:
    """One adapter's experts in one layer, as ExpertsStep uses them: views of its rows of the MLP's LoRA
    pools (copies in the model's dtype where the pools are stored narrower; None where a module has no pools); front_t = [W_r;] A_G; A_U stacked and transposed (d, F)
    for the one shrink GEMM (router rows only when `fused`: float32 serving; else router_t, the router
    in float32); global_t (d, E) and global_b (E,), MoLE's global gates, if the adapter has them."""

    __slots__ = ("router", "key", "held", "gate_b", "up_b", "down_a", "down_b", "front_t", "router_t", "global_t", "global_b")

    def __init__(self, weights: MoELoraWeights, layer: int, key: tuple, tensors: tuple, start: int, fused: bool, dtype: torch.dtype):
        rows = slice(start, start + weights.num_experts * weights.expert_rank)
        ga, gb, ua, ub, da, db = tensors
        self.router, self.key = weights.routers[layer], key
        self.held = tensors  # the pools, alive while the key names them (their ids are in it)
        # dtype: the model's; pools stored narrower (--lora-dtype) are widened to it once, here

        def own(t: torch.Tensor) -> torch.Tensor:
            return t[rows] if t.dtype == dtype else t[rows].to(dtype)

        self.gate_b, self.up_b, self.down_a, self.down_b = (None if t is None else own(t) for t in (gb, ub, da, db))
        parts = ([self.router] if fused else []) + [own(a) for a, b in ((ga, gb), (ua, ub)) if a is not None and b is not None]
        self.front_t = torch.cat(parts).T.contiguous() if parts else None
        self.router_t = None if fused else self.router.float().T.contiguous()
        w_g, b_g = weights.global_gates.get(layer, (None, None))
        self.global_t = None if w_g is None else w_g.float().T.contiguous()
        self.global_b = None if w_g is None else (b_g.float() if b_g is not None else torch.zeros(weights.num_experts, device=w_g.device))


# Stacked weights of the last group per (layer, expert shape), kept between steps (ExpertsStep._stacked),
# each at most GROUP_CACHE_BYTES: at most that many bytes per layer and expert shape in use.
GROUP_CACHE_BYTES = 8 << 20
_GROUP_CACHE: dict[tuple, tuple] = {}


class _Stacked:
    """A group's _ExpertRows, each field stacked over its adapters (A, ...): a view for one adapter."""

    __slots__ = ("front_t", "router_t", "global_t", "global_b", "gate_b", "up_b", "down_a", "down_b", "nbytes")

    def __init__(self, rows: list[_ExpertRows]):
        self.nbytes = 0
        for name in self.__slots__[:-1]:
            parts = [getattr(r, name) for r in rows]
            t = None if parts[0] is None else parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)
            setattr(self, name, t)
            self.nbytes += 0 if t is None else t.nbytes


@dataclass(frozen=True, slots=True)
class _Member:
    """One adapter in an ExpertsStep: its tokens' rows in the flat batch (ascending), the first of its
    expert rows in the MLP pools (expert e: [start + e·r, start + (e+1)·r)) and its sequences."""

    weights: MoELoraWeights
    tokens: torch.Tensor
    expert_row_start: int
    seqs: list[SeqRows]


class ExpertsStep(StepHook):
    """A group of routed-experts adapters with experts of the same shape, in one step: one set of ops per
    layer for all of them (each op's fixed cost, not its arithmetic, is most of a decode step's work).
    In each layer with a router, before the down projection their tokens' activations become Σ_e p_e a_e
    (the model's down GEMM then runs once per token), and after it their outputs get the experts' down
    LoRAs, z B_D. See the module docstring for the math.

    The adapters' tokens are laid out (A, n, ·): A adapters, n = the most tokens any of them has. When
    they fill one slice of the batch, n each and in order (a decode step's usual layout), that is a
    view; otherwise rows are gathered (shorter adapters padded with their own last row) and the valid
    ones written back."""

    def __init__(self, members: list[_Member]):
        self.members = members
        self.weights = [m.weights for m in members]
        first = self.weights[0]
        self.num_experts, self.rank, self.routing, self.top_k = first.num_experts, first.expert_rank, first.routing, first.top_k
        self.shape = _shape(first)
        counts = [len(m.tokens) for m in members]
        self.n = max(counts)
        # the layout is decided from the sequences' rows on the host (the token tensors are on the device)
        host_rows = [row for m in members for sq in m.seqs for row in range(sq.start, sq.end)]
        start = host_rows[0] if host_rows else 0
        if all(c == self.n for c in counts) and host_rows == list(range(start, start + len(host_rows))):
            self.span, self.valid, self.rows = (start, start + len(host_rows)), None, None
        else:
            self.span = None
            self.rows = torch.cat([m.tokens for m in members])  # the flat batch rows of the valid entries, in (adapter, token) order ...
            device = self.rows.device
            self.valid = torch.cat([torch.arange(c, device=device) + a * self.n for a, c in enumerate(counts)])  # ... and their positions in (A·n)
            self.gather = torch.stack([torch.cat([m.tokens, m.tokens[-1:].expand(self.n - c)]) for m, c in zip(members, counts)]).view(-1)
        seqs = [s for m in members for s in m.seqs]
        self.pooled = _CausalMeans(self.weights, seqs) if first.global_gates else None
        self._down: tuple | None = None  # (layer, z, routing weights, down_b rows) for after_mlp

    def _lay_out(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of the flat batch (T, ·) -> (A, n, ·)."""
        if self.span:
            return t[self.span[0] : self.span[1]].view(len(self.members), self.n, t.shape[1])
        return t.index_select(0, self.gather).view(len(self.members), self.n, t.shape[1])

    def _write_back(self, laid: torch.Tensor, t: torch.Tensor, add: bool) -> None:
        """(A, n, ·) -> the valid rows of the flat batch (nothing to do for a view)."""
        if self.span is None:
            valid = laid.reshape(-1, t.shape[1]).index_select(0, self.valid)
            t.index_add_(0, self.rows, valid) if add else t.index_copy_(0, self.rows, valid)

    def _layer(self, layer, fused: bool) -> tuple[list[_ExpertRows], tuple]:
        """Each adapter's expert rows in a layer's pools, as views, with its stacked and transposed shrink
        weights, cached in the weights across steps (MoELoraWeights.fronts) while the router and the
        layer's MLP pools are the tensors, at the versions, they were made from (a pool written for any
        adapter remakes the copies; the views hold the pools, so an identity is never reused). Also
        returns those pool identities and versions, for _stacked."""
        gate_up, down = layer.gate_up_proj.slots, layer.down_proj.slots
        pools = (gate_up["gate_proj"].pools, gate_up["up_proj"].pools, down["down_proj"].pools)
        tensors = tuple(p.get(name) for p in pools for name in ("lora_a", "lora_b"))
        versions = tuple(None if t is None else (id(t), t._version) for t in tensors)
        out = []
        for m in self.members:
            router = m.weights.routers[layer.layer_idx]
            key = (m.expert_row_start, fused, router._version, versions)
            rows = m.weights.fronts.get(layer.layer_idx)
            if rows is None or rows.router is not router or rows.key != key:
                rows = m.weights.fronts[layer.layer_idx] = _ExpertRows(m.weights, layer.layer_idx, key, tensors, m.expert_row_start, fused,
                                                                       layer.input_layernorm.weight.dtype)
            out.append(rows)
        return out, versions

    def _stacked(self, layer_idx: int, rows: list[_ExpertRows], versions: tuple) -> _Stacked:
        """The group's weights per layer, stacked (A, ...): views for one adapter; for several, copies,
        kept in _GROUP_CACHE (one group per layer and expert shape) while the group, its rows and every
        pool they come from are unchanged and they take at most GROUP_CACHE_BYTES: a decode step's
        group usually stays the same for many steps. (A grouped kernel that reads the pools' rows by
        index, as on a GPU, needs no copies.)"""
        if len(rows) == 1:
            return _Stacked(rows)
        key = (layer_idx, self.shape)
        hit = _GROUP_CACHE.get(key)
        if hit is not None and hit[1] == versions and len(hit[0]) == len(rows) and all(a is b for a, b in zip(hit[0], rows)):
            return hit[2]
        stacked = _Stacked(rows)
        if stacked.nbytes <= GROUP_CACHE_BYTES:
            _GROUP_CACHE[key] = (tuple(rows), versions, stacked)
        else:
            _GROUP_CACHE.pop(key, None)
        return stacked

    def _route(self, logits: torch.Tensor, pooled: torch.Tensor | None, st: _Stacked) -> tuple[torch.Tensor | None, torch.Tensor]:
        """MoELoraWeights.route from the router logits (A, n, E), for the group at once: the renormalised
        top-k of softmax(l) is the softmax of the top-k logits; sigmoid gates times MoLE's global gates."""
        if self.routing == "sigmoid":
            gates = torch.sigmoid(logits)
            if pooled is not None:
                g = torch.baddbmm(st.global_b.unsqueeze(1), pooled, st.global_t)
                gates = gates * torch.sigmoid(g).to(gates.dtype)
            return None, gates
        top, experts = logits.topk(self.top_k, dim=-1)
        return experts, top.softmax(-1)

    def before_down(self, layer, h: torch.Tensor, gate_up: torch.Tensor, act: torch.Tensor) -> None:
        idx = layer.layer_idx
        if idx not in self.weights[0].routers:
            return  # no experts in this layer: the base MLP stands (the group shares its router layers)
        x, gu = self._lay_out(h), self._lay_out(gate_up)
        fused = x.dtype == torch.float32  # else the routing runs in float32 on its own, as route() computes it
        st = self._stacked(idx, *self._layer(layer, fused))
        E, er = self.num_experts, self.num_experts * self.rank
        s = torch.bmm(x, st.front_t) if st.front_t is not None else None  # one GEMM: [router logits,] then every expert's gate and up shrinks
        logits = s[..., :E] if fused else torch.bmm(x.float(), st.router_t)
        off = E if fused else 0
        sg = s[..., off : off + er] if st.gate_b is not None else None
        su = s[..., -er:] if st.up_b is not None else None
        pooled = None
        if self.pooled is not None:
            flat = x.view(-1, x.shape[-1]) if self.span else x.view(-1, x.shape[-1]).index_select(0, self.valid)
            pooled = self.pooled.means(idx, flat)
            if self.span is None:
                pooled = pooled.new_zeros(len(self.members) * self.n, pooled.shape[1]).index_copy_(0, self.valid, pooled)
            pooled = pooled.view(len(self.members), self.n, -1)
        experts, probs = self._route(logits, pooled, st)
        mixed = act[self.span[0] : self.span[1]].view(len(self.members), self.n, -1) if self.span else act.new_empty(len(self.members), self.n, act.shape[1])
        z = layer.down_proj.kernels.routed_experts(mixed, gu, sg, su, st.gate_b, st.up_b, st.down_a, experts, probs, E)
        self._write_back(mixed, act, add=False)
        self._down = (idx, z, probs, st.down_b)

    def after_mlp(self, layer, h: torch.Tensor, gate_up: torch.Tensor, out: torch.Tensor) -> None:
        if self._down is None or self._down[0] != layer.layer_idx:
            return
        _, z, probs, db = self._down
        self._down = None
        bias = layer.down_proj.bias  # the down GEMM added it once; the experts' mixture has Σ_e p_e of it
        if (z is None or db is None) and bias is None:
            return
        A, d = len(self.members), out.shape[1]
        laid = out[self.span[0] : self.span[1]].view(A, self.n, d) if self.span else out.new_zeros(A, self.n, d)
        if z is not None and db is not None:
            laid.baddbmm_(z, db)
        if bias is not None:
            laid.add_((probs.sum(-1, keepdim=True).to(out.dtype) - 1) * bias)
        self._write_back(laid, out, add=True)

    def end_step(self) -> None:
        if self.pooled is not None:
            self.pooled.commit()


class ExpertsStepReference(StepHook):
    """Readable reference of ExpertsStep (same arguments, same hook points), for tests: nothing changes
    before the down projection; after the MLP each of its tokens' outputs is recomputed as
    Σ_e p_e · [base_down(a_e) + ΔD_e(a_e)] by a loop over tokens and routed experts in float32, from
    the same pool rows (the original per-(token, expert) formulation, base down GEMM per row)."""

    def __init__(self, weights: MoELoraWeights, tokens: torch.Tensor, expert_row_start: int, seqs: list[SeqRows]):
        self.weights, self.tokens, self.expert_row_start = weights, tokens, expert_row_start
        self.pooled = _CausalMeans([weights], seqs, reference=True) if weights.global_gates else None

    def after_mlp(self, layer, h: torch.Tensor, gate_up: torch.Tensor, out: torch.Tensor) -> None:
        w, idx = self.weights, layer.layer_idx
        if idx not in w.routers:
            return
        x, r, i = h[self.tokens], w.expert_rank, layer.intermediate_size
        pooled = self.pooled.means(idx, x) if self.pooled is not None else None
        experts, probs = w.route(idx, x, pooled)

        def rows(linear, module: str, e: int) -> tuple[torch.Tensor, torch.Tensor] | None:
            pools = linear.slots[module].pools
            if "lora_a" not in pools:
                return None
            o = self.expert_row_start + e * r
            return pools["lora_a"][o : o + r].float(), pools["lora_b"][o : o + r].float()

        for row, t in enumerate(self.tokens.tolist()):
            total = torch.zeros(out.shape[1], device=out.device)
            for j in range(probs.shape[1]):
                e = j if experts is None else int(experts[row, j])
                g, u = gate_up[t, :i].float(), gate_up[t, i:].float()
                if (ab := rows(layer.gate_up_proj, "gate_proj", e)) is not None:
                    g = g + (x[row].float() @ ab[0].T) @ ab[1]
                if (ab := rows(layer.gate_up_proj, "up_proj", e)) is not None:
                    u = u + (x[row].float() @ ab[0].T) @ ab[1]
                a = F.silu(g) * u
                y = layer.down_proj.base(a.to(out.dtype).unsqueeze(0))[0].float()
                if (ab := rows(layer.down_proj, "down_proj", e)) is not None:
                    y = y + (a @ ab[0].T) @ ab[1]
                total += float(probs[row, j]) * y
            out[t] = total.to(out.dtype)

    def end_step(self) -> None:
        if self.pooled is not None:
            self.pooled.commit()


class _CausalMeans:
    """MoLE's per-sample input in one step: for each of the adapter's tokens, the causal mean of a layer's
    MLP inputs over its sequence so far (module docstring), from the running sums each sequence carries
    in its hook state ("moe_sums": (layers, d) float64 over positions < "moe_pos")."""

    def __init__(self, weights: list[MoELoraWeights], seqs: list[SeqRows], reference: bool = False):
        self.running_sums = segment_running_sums_reference if reference else segment_running_sums
        layers = max(max(w.global_gates) for w in weights) + 1
        router = next(iter(weights[0].routers.values()))
        self.seqs, d, device = seqs, router.shape[1], router.device
        seg, first, last, count, base = [], [], [], [], []
        for i, sq in enumerate(seqs):
            n = sq.end - sq.start
            first.append(len(seg))
            seg += [i] * n
            last.append(len(seg) - 1)
            count += range(sq.pos + 1, sq.pos + n + 1)  # tokens pooled at each row: positions 0..t
            if sq.pos == 0:
                base.append(torch.zeros(layers, d, dtype=torch.float64, device=device))
            elif sq.state.get("moe_pos") == sq.pos:
                base.append(sq.state["moe_sums"])
            else:  # a bug, never a silent wrong answer: the step fails and the sequence fails alone
                raise RuntimeError(f"MoLE running sums of a sequence at position {sq.pos} are missing (have {sq.state.get('moe_pos')})")
        # (MoLE's global gates only: one more small host->device copy in the step)
        packed = torch.tensor(seg + first + last + count, dtype=torch.long).to(device)
        self.seg, self.first, self.last = packed[: len(seg)], packed[len(seg) : len(seg) + len(first)], packed[len(seg) + len(first) : -len(count)]
        self.count = packed[-len(count):].to(torch.float64).unsqueeze(1)
        self.sums = torch.stack(base)  # (S, layers, d): carried in ...
        self.new = self.sums.clone()  # ... and carried out, committed by end_step

    def means(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        run = self.running_sums(x, self.seg, self.first, self.sums[:, layer])  # (n, d) float64
        self.new[:, layer] = run.index_select(0, self.last)
        return (run / self.count).to(torch.float32)

    def commit(self) -> None:
        for sq, sums in zip(self.seqs, self.new.unbind(0)):  # views of this step's tensor: no copy
            sq.state["moe_sums"], sq.state["moe_pos"] = sums, sq.pos + sq.end - sq.start


def _shape(w: MoELoraWeights) -> tuple:
    """What adapters served by one ExpertsStep share: their experts' shape, routing and router layers."""
    return (w.num_experts, w.expert_rank, w.routing, w.top_k, tuple(sorted(w.routers)), tuple(sorted(w.global_gates)))


def _step_hooks(adapters: list[HookedAdapter]) -> list[ExpertsStep]:
    """One hook per group: adapters with fewer than TOPK_MIN_TOKENS tokens in the step (decode-sized)
    whose experts have the same shape share one; an adapter with more (a prefill chunk) runs alone,
    so that no group pads a short adapter to a long one's length."""
    groups: dict[object, list[_Member]] = {}
    for a in adapters:
        w = a.entry.weights
        member = _Member(w, a.tokens, a.entry.row_start + w.attn_rank, a.seqs)
        groups.setdefault(_shape(w) if len(a.tokens) < TOPK_MIN_TOKENS else id(a), []).append(member)
    return [ExpertsStep(members) for members in groups.values()]


FAMILY = Family(
    "moe-lora", lambda tag: tag.names("moe-lora", "MIXLORA"),
    lambda files, name, ctx: parse_mixlora(files, name, ctx.model_cfg, ctx.dtype, ctx.max_rank),
    step_hooks=_step_hooks,
)
