"""Read a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).

Only safetensors is read: pickled `adapter_model.bin` files are refused, never unpickled.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from server.models.config import ModelConfig

SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


class AdapterError(ValueError):
    """The adapter's files are malformed or do not fit the base model; the message says why."""


@dataclass(slots=True)
class LoraWeights:
    name: str
    rank: int  # the largest rank over its modules: rows it takes in the pools
    # (layer, module) -> (A (r, d_in), B (d_out, r), scale)
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b, _ in self.modules.values())


def module_dims(cfg: ModelConfig, module: str) -> tuple[int, int]:
    """(d_in, d_out) of a logical module of the base model."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
        "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d),
    }[module]


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a pattern matches the module key or its suffix."""
    for pattern, value in patterns.items():
        if key == pattern or re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def read_adapter_config(path: Path) -> dict:
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterError(f"{path}: adapter_config.json is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: adapter_config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: adapter_config.json must hold a JSON object")
    return cfg


def load_peft_lora(path: Path, name: str, model_cfg: ModelConfig, dtype: torch.dtype, max_rank: int) -> LoraWeights:
    path = Path(path)
    cfg = read_adapter_config(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{name}: peft_type {cfg.get('peft_type')!r} is not a LoRA adapter")
    if cfg.get("use_dora"):
        raise AdapterError(f"{name}: DoRA adapters are not supported yet")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{name}: adapters that train biases (bias={cfg['bias']!r}) are not supported")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{name}: modules_to_save {cfg['modules_to_save']} is not supported: only LoRA deltas are served")
    weights_path = path / "adapter_model.safetensors"
    if not weights_path.is_file():
        hint = " (pickled adapter_model.bin is never loaded: convert it to safetensors)" if (path / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{name}: adapter_model.safetensors is missing{hint}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{name}: adapter_model.safetensors is unreadable ({e})") from None

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.search(key)
        if m is None:
            raise AdapterError(f"{name}: unexpected tensor {key!r} (only LoRA A/B weights of decoder layers are served)")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if module not in SUPPORTED_MODULES:
            raise AdapterError(f"{name}: target module {module!r} is not supported (supported: {', '.join(SUPPORTED_MODULES)})")
        if layer >= model_cfg.num_layers:
            raise AdapterError(f"{name}: {key} addresses layer {layer} but the base model has {model_cfg.num_layers}")
        pairs.setdefault((layer, module), {})[which] = tensor
    if not pairs:
        raise AdapterError(f"{name}: adapter_model.safetensors holds no LoRA weights")

    default_r, default_alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    out = LoraWeights(name=name, rank=0)
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{name}: layer {layer} {module} has lora_{''.join(ab)} but not its pair")
        a, b = ab["A"], ab["B"]
        d_in, d_out = module_dims(model_cfg, module)
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or b.shape != (d_out, r):
            raise AdapterError(
                f"{name}: layer {layer} {module} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                f"the base model needs A (r, {d_in}) and B ({d_out}, r)"
            )
        if r > max_rank:
            raise AdapterError(f"{name}: rank {r} exceeds --max-lora-rank {max_rank}")
        module_key = f"model.layers.{layer}.{'mlp' if module in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{module}"
        declared_r = _pattern_value(rank_pattern, module_key, default_r)
        if declared_r != r:
            raise AdapterError(f"{name}: layer {layer} {module} has rank {r} but the config declares {declared_r}")
        alpha = _pattern_value(alpha_pattern, module_key, default_alpha)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out.modules[(layer, module)] = (a.to(dtype), b.to(dtype), float(scale))
        out.rank = max(out.rank, r)
    return out
