"""Load a Hugging Face Llama-family checkpoint directory (config.json + *.safetensors) into our model."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from server.models.config import ModelConfig
from server.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.(weight|bias)$")
_NORM_KEY = re.compile(r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")


def load_model(model_dir: Path, dtype: torch.dtype, max_positions: int, progress: bool = True) -> LlamaForCausalLM:
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no *.safetensors weights")
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg, dtype, max_positions)
    loaded: set[str] = set()
    handles = [safe_open(str(f), framework="pt") for f in files]
    keys = [(h, k) for h in handles for k in h.keys()]
    for handle, key in tqdm(keys, desc=f"Loading {model_dir.name}", unit="tensor", disable=not progress, leave=False):
        target = _place(model, key)
        if target is None:
            log.debug("ignoring checkpoint tensor %s", key)
            continue
        dest, name = target
        src = handle.get_tensor(key)
        if dest.shape != src.shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(src.shape)} does not fit the config's {tuple(dest.shape)}")
        dest.copy_(src)
        loaded.add(name)
    missing = set(_expected_names(model)) - loaded
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    return model.eval()


def _expected_names(model: LlamaForCausalLM) -> list[str]:
    names = ["embed_tokens.weight", "norm.weight"] + ([] if model.config.tie_word_embeddings else ["lm_head.weight"])
    for i, layer in enumerate(model.layers):
        for slot, lin in layer.adapter_targets().items():
            names.append(f"{i}.{slot}.weight")
            if lin.bias is not None:
                names.append(f"{i}.{slot}.bias")
        names += [f"{i}.input_layernorm", f"{i}.post_attention_layernorm"]
    return names


def _place(model: LlamaForCausalLM, key: str) -> tuple[torch.Tensor, str] | None:
    """The destination view of a checkpoint tensor, and the name it is tracked under."""
    if key == "model.embed_tokens.weight":
        return model.embed_tokens.weight.data, "embed_tokens.weight"
    if key == "lm_head.weight":
        return (None if model.config.tie_word_embeddings else (model.lm_head_weight.data, "lm_head.weight"))
    if key == "model.norm.weight":
        return model.norm.weight.data, "norm.weight"
    if m := _NORM_KEY.match(key):
        layer = model.layers[int(m.group(1))]
        return getattr(layer, m.group(2)).weight.data, f"{m.group(1)}.{m.group(2)}"
    if m := _LAYER_KEY.match(key):
        i, module, kind = int(m.group(1)), m.group(3), m.group(4)
        lin = model.layers[i].adapter_targets().get(module)
        if lin is None:
            return None
        slot = lin.slots[module]
        full = lin.weight.data if kind == "weight" else lin.bias.data if lin.bias is not None else None
        if full is None:
            raise ValueError(f"{key}: the checkpoint has a bias the config does not declare")
        return full[slot.out_start : slot.out_end], f"{i}.{module}.{kind}"
    return None
