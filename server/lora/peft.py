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
from safetensors.torch import load as safetensors_load

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

    family = "lora"

    @property
    def units(self) -> int:
        return self.rank

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b, _ in self.modules.values())

    def write_into(self, pools: dict[str, torch.Tensor], layer: int, module: str, start: int, dtype: torch.dtype) -> None:
        """Place this module's A rows and scaled Bᵀ rows at [start, start + r) of the LoRA pools."""
        a, b, scale = self.modules[(layer, module)]
        r = a.shape[0]
        pools["lora_a"][start : start + r] = a
        pools["lora_b"][start : start + r] = (b.float().T * scale).to(dtype)


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


CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def parse_adapter_config(raw: bytes, name: str) -> dict:
    try:
        cfg = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{name}: {CONFIG_FILE} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{name}: {CONFIG_FILE} must hold a JSON object")
    return cfg


def read_adapter_files(path: Path, name: str) -> dict[str, bytes]:
    """The two PEFT files of a directory, as bytes."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise AdapterError(f"{name}: {path} has no {CONFIG_FILE}")
    if not (path / WEIGHTS_FILE).is_file():
        hint = " (pickled adapter_model.bin is never loaded: convert it to safetensors)" if (path / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{name}: {WEIGHTS_FILE} is missing{hint}")
    return {CONFIG_FILE: (path / CONFIG_FILE).read_bytes(), WEIGHTS_FILE: (path / WEIGHTS_FILE).read_bytes()}


def load_peft_lora(path: Path, name: str, model_cfg: ModelConfig, dtype: torch.dtype, max_rank: int) -> LoraWeights:
    return parse_peft_lora(read_adapter_files(path, name), name, model_cfg, dtype, max_rank)


def parse_peft_lora(files: dict[str, bytes], name: str, model_cfg: ModelConfig, dtype: torch.dtype, max_rank: int) -> LoraWeights:
    """Validate PEFT LoRA files against the base model and return its weights (A, B, scale per module)."""
    if CONFIG_FILE not in files or WEIGHTS_FILE not in files:
        raise AdapterError(f"{name}: a LoRA adapter needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg = parse_adapter_config(files[CONFIG_FILE], name)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{name}: peft_type {cfg.get('peft_type')!r} is not a LoRA adapter")
    if cfg.get("use_dora"):
        raise AdapterError(f"{name}: DoRA adapters are not supported yet")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{name}: adapters that train biases (bias={cfg['bias']!r}) are not supported")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{name}: modules_to_save {cfg['modules_to_save']} is not supported: only LoRA deltas are served")
    try:
        tensors = safetensors_load(files[WEIGHTS_FILE])
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{name}: {WEIGHTS_FILE} is not a readable safetensors file ({e})") from None

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
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(f"{name}: layer {layer} {module} weights must be floating point")
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
