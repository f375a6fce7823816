"""Rank stacking: a weighted sum of LoRA updates written exactly as ONE LoRA.

Semantics: ΔW = Σ_i w_i s_i B_i A_i  =  B A  with  A = [A_1; A_2; ...] (rows: ranks stacked) and
B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] (columns), since B A = Σ_i (w_i s_i B_i) A_i. The result has
scale 1; its rank on a module is the sum of the ranks of the members that adapt that module (a member
without the module contributes nothing: no zero rows). Shapes: A_i (r_i, d_in), B_i (d_out, r_i).

Used by SG-LoRA's similarity fusion (server.families.sglora, to write a new adapter) and by
multi-adapter requests (server.adapters.stacking, to serve several adapters as one, per request).
"""
from __future__ import annotations

import torch

from server.lora.peft import LoraWeights

Modules = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, module) -> (A (r, d_in), B (d_out, r)), scale 1


def fused_ranks(loras: list[LoraWeights]) -> dict[tuple[int, str], int]:
    """(layer, module) -> rank of the rank-stacked sum: the sum of the members' ranks there."""
    out: dict[tuple[int, str], int] = {}
    for w in loras:
        for key, (a, _, _) in w.modules.items():
            out[key] = out.get(key, 0) + a.shape[0]
    return out


def stack_lora_modules(loras: list[LoraWeights], weights: list[float]) -> Modules:
    """Σ_i weights[i] · s_i · B_i A_i per module, as scale-1 (A, B) in float32 (each B_i scaled in float32)."""
    assert len(loras) == len(weights), f"{len(loras)} adapters but {len(weights)} weights"
    blocks: dict[tuple[int, str], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for lora, weight in zip(loras, weights):
        for key, (a, b, scale) in sorted(lora.modules.items()):
            coef = float(weight) * float(scale)
            a_list, b_list = blocks.setdefault(key, ([], []))
            a_list.append(a.float())
            b_list.append(b.float() * coef)
    return {key: (torch.cat(a_list, dim=0), torch.cat(b_list, dim=1)) for key, (a_list, b_list) in sorted(blocks.items())}
