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
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load

from server.lora.peft import CONFIG_FILE, SUPPORTED_MODULES, WEIGHTS_FILE, AdapterError, LoraWeights, module_dims, parse_adapter_config
from server.models.config import ModelConfig

_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.reclora_([AB])$")
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
    family = "reclora"

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())

    def user_weights(self, state: dict | None) -> torch.Tensor:
        """Mixing weights (K,) for a user's stored state; uniform for an unknown user."""
        k = self.num_meta
        if state is None:
            return torch.full((k,), 1.0 / k)
        if "weights" in state:
            w = torch.tensor(state["weights"], dtype=torch.float32)
            if w.shape != (k,):
                raise AdapterError(f"{self.name}: user weights need {k} values, got {w.numel()}")
            return w
        if self.gate is None:
            raise AdapterError(f"{self.name}: this adapter has no gate, so users need stored weights, not a vector")
        u = torch.tensor(state["vector"], dtype=torch.float32)
        w1, b1, w2, b2 = self.gate
        if u.shape != (w1.shape[1],):
            raise AdapterError(f"{self.name}: the user vector needs {w1.shape[1]} values, got {u.numel()}")
        logits = torch.relu(u @ w1.T + b1) @ w2.T + b2
        return torch.softmax(logits / self.temperature, dim=-1)

    def materialize(self, name: str, w: torch.Tensor, dtype: torch.dtype) -> LoraWeights:
        """The user's adapter as an ordinary LoRA: A_u = Σ w_k A_k, B_u = Σ w_k B_k."""
        out = LoraWeights(name=name, rank=self.rank)
        for key, (a, b) in self.modules.items():
            a_u = torch.einsum("k,kri->ri", w, a.float())
            b_u = torch.einsum("k,kor->or", w, b.float())
            out.modules[key] = (a_u.to(dtype), b_u.to(dtype), self.scale)
        return out


def parse_reclora(files: dict[str, bytes], name: str, model_cfg: ModelConfig, max_rank: int) -> RecLoraBank:
    if CONFIG_FILE not in files or WEIGHTS_FILE not in files:
        raise AdapterError(f"{name}: a RecLoRA adapter needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg = parse_adapter_config(files[CONFIG_FILE], name)
    try:
        r, k = int(cfg["r"]), int(cfg["num_meta_loras"])
        alpha, temperature = float(cfg.get("lora_alpha", r)), float(cfg.get("gate_temperature", 1.0))
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"{name}: {CONFIG_FILE} needs integer `r` and `num_meta_loras`") from None
    if not (0 < r <= max_rank) or k < 1 or temperature <= 0:
        raise AdapterError(f"{name}: need 0 < r <= --max-lora-rank {max_rank}, num_meta_loras >= 1, gate_temperature > 0")
    try:
        tensors = safetensors_load(files[WEIGHTS_FILE])
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{name}: {WEIGHTS_FILE} is not a readable safetensors file ({e})") from None
    bank = RecLoraBank(name, r, k, alpha / r, temperature)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key in _GATE:
            continue
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{name}: unexpected tensor {key!r}")
        layer, module = int(m.group(1)), m.group(3)
        if module not in SUPPORTED_MODULES or layer >= model_cfg.num_layers:
            raise AdapterError(f"{name}: {key} names no module of the base model")
        pairs.setdefault((layer, module), {})[m.group(4)] = t
    if not pairs:
        raise AdapterError(f"{name}: no meta-LoRA weights")
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{name}: layer {layer} {module} lacks its reclora_A/reclora_B pair")
        d_in, d_out = module_dims(model_cfg, module)
        a, b = ab["A"], ab["B"]
        if a.shape != (k, r, d_in) or b.shape != (k, d_out, r) or not a.is_floating_point() or not b.is_floating_point():
            raise AdapterError(f"{name}: layer {layer} {module} needs reclora_A ({k}, {r}, {d_in}) and reclora_B ({k}, {d_out}, {r}), got {tuple(a.shape)} and {tuple(b.shape)}")
        bank.modules[(layer, module)] = (a.float(), b.float())
    present = [g for g in _GATE if g in tensors]
    if present:
        if len(present) != 4:
            raise AdapterError(f"{name}: the gate needs all of {', '.join(_GATE)}")
        w1, b1, w2, b2 = (tensors[g].float() for g in _GATE)
        if w1.dim() != 2 or b1.shape != (w1.shape[0],) or w2.shape != (k, w1.shape[0]) or b2.shape != (k,):
            raise AdapterError(f"{name}: gate shapes do not chain: {tuple(w1.shape)}, {tuple(b1.shape)}, {tuple(w2.shape)}, {tuple(b2.shape)}")
        bank.gate = (w1, b1, w2, b2)
    return bank
