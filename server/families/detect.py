"""Which adapter family a set of files is, and parsing it into the engine's weights."""
from __future__ import annotations

import torch

from server.lora.config_schema import FamilyTag
from server.lora.peft import CONFIG_FILE, AdapterError, parse_adapter_config, parse_peft_lora
from server.models.config import ModelConfig

FAMILIES = ("lora", "s2ft", "reclora", "moe-lora")


def detect_family(files: dict[str, bytes], name: str) -> str:
    if CONFIG_FILE not in files:
        raise AdapterError(f"{name}: {CONFIG_FILE} is missing")
    tag = parse_adapter_config(files[CONFIG_FILE], name, FamilyTag)
    family = tag.hotswap_family
    if family is None:
        family = {"LORA": "lora", "S2FT": "s2ft", "RECLORA": "reclora", "MIXLORA": "moe-lora"}.get(tag.peft_type)
    if family not in FAMILIES:
        raise AdapterError(f"{name}: adapter type {tag.peft_type!r} is not supported (supported families: {', '.join(FAMILIES)})")
    return family


def parse_adapter(files: dict[str, bytes], name: str, model_cfg: ModelConfig, dtype: torch.dtype, max_rank: int, family: str | None = None):
    """LoraWeights, S2FTWeights or (for RecLoRA, materialised per user later) a RecLoraBank;
    `family`, when given, must match what the files are."""
    found = detect_family(files, name)
    if family is not None and family != found:
        raise AdapterError(f"{name}: the files are a {found} adapter, not {family}")
    if found == "moe-lora":
        from server.families.moe import parse_mixlora

        return parse_mixlora(files, name, model_cfg, dtype, max_rank)
    if found == "reclora":
        from server.families.reclora import parse_reclora

        return parse_reclora(files, name, model_cfg, max_rank)
    if found == "s2ft":
        from server.families.s2ft import parse_s2ft

        return parse_s2ft(files, name, model_cfg, dtype)
    return parse_peft_lora(files, name, model_cfg, dtype, max_rank)


def module_units(weights) -> dict[str, int]:
    """module -> rank (LoRA, RecLoRA, experts) or entries (S²FT), the largest over layers: what a manifest records."""
    if weights.family == "moe-lora":
        return {m: weights.expert_rank if (m in ("gate_proj", "up_proj", "down_proj")) else weights.attn_rank for _, m in weights.modules}
    out: dict[str, int] = {}
    for (_, module), value in weights.modules.items():
        if weights.family == "s2ft":
            n = value.indices.numel()
        elif weights.family == "reclora":
            n = value[0].shape[1]
        else:
            n = value[0].shape[0]
        out[module] = max(out.get(module, 0), n)
    return out
