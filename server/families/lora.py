"""Plain LoRA in PEFT format: y += s · (x Aᵀ) Bᵀ per target module, through the segmented LoRA op.

The file format and its reader are PEFT's (`server.lora.peft`: `parse_peft_lora`, `LoraWeights`).
The LoRA pool space keeps, per module, `lora_a (N, d_in)` and `lora_b (N, d_out)` rows: an adapter
of rank r owns rows [start, start + r), Bᵀ with the scale folded in. Routed experts, RecLoRA users
and SG-LoRA adapters are served from the same space.
"""
from __future__ import annotations

import torch

from server.families.base import Family, ParseContext
from server.lora.config_schema import FamilyTag
from server.lora.peft import LoraWeights, parse_peft_lora


class LoraSpace:
    name = "lora"

    def pools(self, d_in: int, d_out: int, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"lora_a": ((d_in,), dtype), "lora_b": ((d_out,), dtype)}

    def has_pools(self, pools: dict[str, torch.Tensor]) -> bool:
        return "lora_a" in pools

    def apply(self, out: torch.Tensor, x: torch.Tensor, slot, plan, linear) -> None:
        linear.kernels.sgmv_lora(out, x, slot.pools["lora_a"], slot.pools["lora_b"], plan)


def _claims(tag: FamilyTag) -> bool:
    return tag.names("lora", "LORA") and not tag.use_dora


def _parse(files: dict[str, bytes], name: str, ctx: ParseContext) -> LoraWeights:
    return parse_peft_lora(files, name, ctx.model_cfg, ctx.dtype, ctx.max_rank)


SPACE = LoraSpace()
FAMILY = Family("lora", _claims, _parse)
