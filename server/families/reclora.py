"""RecLoRA: K meta-LoRAs per module mixed by per-user weights (Gebro13/RecLoRA).

    ΔW_u = s · (Σ_k w_k B_k)(Σ_k w_k A_k)        A and B are mixed separately
    w = softmax(gate(u) / T)  from a user vector u, or stored weights w

Serving materialises (A_u, B_u) once per (user, state) into an ordinary LoRA — it then rides the
same row pools and segmented kernels as every other LoRA in the batch. `kernels.reclora` has the
bank formulation (no materialisation) for comparison; see docs/adapters.md for the measurement.

Files: `adapter_config.json` `{"peft_type": "RECLORA", "r", "lora_alpha", "num_meta_loras": K,
"target_modules", "gate_temperature": T}` and `adapter_model.safetensors` with, per module,
`model.layers.{i}.{self_attn|mlp}.{module}.reclora_A` (K, r, d_in) and `.reclora_B` (K, d_out, r),
and optionally a gate MLP `reclora_gate.0.weight` (H, U), `.0.bias` (H), `.2.weight` (K, H), `.2.bias` (K)
(Linear -> ReLU -> Linear). Unknown users (no stored state, or no `user` field) get uniform weights 1/K.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from server.families.base import Family
from server.lora.config_schema import RecLoraConfig, brief
from server.lora.peft import (
    CONFIG_FILE, WEIGHTS_FILE, AdapterError, LoraWeights, cast_weight, load_tensors,
    parse_adapter_config, peak_abs,
)
from server.models.config import ModelConfig
from server.models.modules import ADAPTER_MODULES, module_dims

# [0-9]{1,9}, not \d+: int() of a Unicode digit or of thousands of digits must never be reached
_KEY = re.compile(r"^model\.layers\.([0-9]{1,9})\.(self_attn|mlp)\.(\w+)\.reclora_([AB])$")
# A user's mixture must stay finite in float32, where it is computed; half of the range leaves room for rounding.
_MIX_LIMIT = torch.finfo(torch.float32).max / 2
_GATE = ("reclora_gate.0.weight", "reclora_gate.0.bias", "reclora_gate.2.weight", "reclora_gate.2.bias")


@dataclass(slots=True)
class RecLoraBank:
    name: str
    rank: int
    num_meta: int
    scale: float
    temperature: float
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (K,r,d_in), (K,d_out,r)
    gate: tuple[torch.Tensor, ...] | None = None
    # the largest |entry| of any A_k, or of any B_k times max(1, |scale|): Σ_k |w_k| times it bounds
    # every entry of a user's materialised A_u and s·B_u
    peak: float = 0.0
    family = "reclora"

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())

    def module_units(self) -> dict[str, int]:
        return {module: self.rank for _, module in self.modules}

    def personalize(self, name: str, state: dict | None, dtype: torch.dtype) -> LoraWeights:
        """The adapter for a user with this stored state (None: unknown, uniform), as LoRA rows named `name`."""
        return self.materialize(name, self.user_weights(state), dtype)

    def user_weights(self, state: dict | None) -> torch.Tensor:
        """Mixing weights (K,) for a user's stored state ({"weights": [K numbers]} or {"vector": [U numbers]});
        uniform for an unknown user. AdapterError if the state does not fit this adapter."""
        k = self.num_meta
        if state is None:
            return torch.full((k,), 1.0 / k)
        if "weights" in state:
            w = self._numbers(state["weights"], k, "user weights (one per meta-LoRA)")
        else:
            if self.gate is None:
                raise AdapterError(f"{self.name}: this adapter has no gate, so users need stored weights, not a vector")
            w1, b1, w2, b2 = self.gate
            u = self._numbers(state.get("vector"), w1.shape[1], "the user vector")
            logits = torch.relu(u @ w1.T + b1) @ w2.T + b2
            w = torch.softmax(logits / self.temperature, dim=-1)
            if not bool(torch.isfinite(w).all()):
                raise AdapterError(f"{self.name}: the gate overflows on this user vector (its weights are not finite): scale the vector down")
        if float(w.abs().sum()) * self.peak > _MIX_LIMIT:
            raise AdapterError(f"{self.name}: user weights this large make the user's adapter overflow float32: keep sum(|w|) below {_MIX_LIMIT / self.peak:.3g}")
        return w

    def _numbers(self, values: object, n: int, what: str) -> torch.Tensor:
        """`values` as a float32 tensor: a list of n finite numbers (bools are not numbers), finite in float32 too."""
        if not isinstance(values, list) or len(values) != n or not all(type(v) in (int, float) for v in values):
            raise AdapterError(f"{self.name}: {what} must be a list of {n} numbers, got {brief(values)}")
        try:
            t = torch.tensor(values, dtype=torch.float32)
        except OverflowError:  # an integer beyond any float
            t = torch.tensor([float("inf")])
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{self.name}: {what} must be finite numbers within float32's range, got {brief(values)}")
        return t

    def materialize(self, name: str, w: torch.Tensor, dtype: torch.dtype) -> LoraWeights:
        """The user's adapter as an ordinary LoRA: A_u = Σ w_k A_k, B_u = Σ w_k B_k."""
        out = LoraWeights(name=name, rank=self.rank)
        for key, (a, b) in self.modules.items():
            a_u = torch.einsum("k,kri->ri", w, a.float())
            b_u = torch.einsum("k,kor->or", w, b.float())
            what = f"{name}: layer {key[0]} {key[1]}"
            out.modules[key] = (cast_weight(a_u, dtype, f"{what} A"), cast_weight(b_u, dtype, f"{what} B", self.scale), self.scale)
        return out


def parse_reclora(files: dict[str, bytes], name: str, model_cfg: ModelConfig, max_rank: int) -> RecLoraBank:
    if CONFIG_FILE not in files or WEIGHTS_FILE not in files:
        raise AdapterError(f"{name}: a RecLoRA adapter needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg = parse_adapter_config(files[CONFIG_FILE], name, RecLoraConfig, max_rank)
    r, k = cfg.r, cfg.num_meta_loras
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else float(r)
    tensors = load_tensors(files[WEIGHTS_FILE], name)
    bank = RecLoraBank(name, r, k, alpha / r, cfg.gate_temperature)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key in _GATE:
            continue
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{name}: unexpected tensor {brief(key)}")
        layer, module, which = int(m.group(1)), m.group(3), m.group(4)
        if module not in ADAPTER_MODULES or layer >= model_cfg.num_layers:
            raise AdapterError(f"{name}: {key} names no module of the base model")
        pair = pairs.setdefault((layer, module), {})
        if which in pair:  # "layers.1" and "layers.01" both name layer 1: which one would be served?
            raise AdapterError(f"{name}: two tensors hold layer {layer} {module} reclora_{which} (the second is {key})")
        pair[which] = t
    if not pairs:
        raise AdapterError(f"{name}: no meta-LoRA weights")
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{name}: layer {layer} {module} lacks its reclora_A/reclora_B pair")
        d_in, d_out = module_dims(model_cfg, module)
        a, b = ab["A"], ab["B"]
        if a.shape != (k, r, d_in) or b.shape != (k, d_out, r) or not a.is_floating_point() or not b.is_floating_point():
            raise AdapterError(
                f"{name}: layer {layer} {module} needs floating point reclora_A ({k}, {r}, {d_in}) and reclora_B ({k}, {d_out}, {r}), "
                f"got {a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}"
            )
        what = f"{name}: layer {layer} {module}"
        a, b = cast_weight(a, torch.float32, f"{what} reclora_A"), cast_weight(b, torch.float32, f"{what} reclora_B", bank.scale)
        bank.modules[(layer, module)] = (a, b)
        bank.peak = max(bank.peak, peak_abs(a), peak_abs(b) * max(1.0, abs(bank.scale)))
    present = [g for g in _GATE if g in tensors]
    if present:
        if len(present) != 4:
            raise AdapterError(f"{name}: the gate needs all of {', '.join(_GATE)}")
        if not all(tensors[g].is_floating_point() for g in _GATE):
            raise AdapterError(f"{name}: the gate's tensors must be floating point, got {', '.join(str(tensors[g].dtype) for g in _GATE)}")
        w1, b1, w2, b2 = (cast_weight(tensors[g], torch.float32, f"{name}: {g}") for g in _GATE)
        if w1.dim() != 2 or b1.shape != (w1.shape[0],) or w2.shape != (k, w1.shape[0]) or b2.shape != (k,):
            raise AdapterError(f"{name}: gate shapes do not chain: {tuple(w1.shape)}, {tuple(b1.shape)}, {tuple(w2.shape)}, {tuple(b2.shape)}")
        bank.gate = (w1, b1, w2, b2)
    return bank


FAMILY = Family(
    "reclora", lambda tag: tag.names("reclora", "RECLORA"),
    lambda files, name, ctx: parse_reclora(files, name, ctx.model_cfg, ctx.max_rank),
    per_user=True,
)
