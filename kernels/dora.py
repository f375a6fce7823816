"""DoRA's per-output-channel rescale for many adapters in one batch (Punica style, same plan as LoRA).

DoRA (weight-decomposed LoRA, PEFT `use_dora`) serves a linear y = x Wᵀ + b with LoRA (A, B, scale s)
and a magnitude m [d_out] as PEFT computes it at inference (peft/tuners/lora/dora.py,
DoraLinearLayer.forward: the bias is taken out, the norm is detached):

    y = b + f ⊙ (x Wᵀ + s · x Aᵀ Bᵀ),   f = m / ‖W + s B A‖_row   (one factor per output channel)

f depends only on the weights, so it is computed once when the adapter is parsed. Serving is two
passes over the step's DoRA segments: the segmented LoRA op (kernels.sgmv_lora) adds s · x Aᵀ Bᵀ into
y, which already holds x Wᵀ + b, then this op rescales those rows around the bias:

    y[s_i:s_{i+1}] = b + f_i ⊙ (y[s_i:s_{i+1}] − b)

Storage: per (layer, module), one pool `dora_g [N, d_out]` (float32) of g = f − 1 rows; an adapter
that owns units [o, o+r) keeps its row at o (the plan's seg_row_start), the others stay zero. g rather
than f, so that a zero row, what the pools hold where an adapter does not write, is the identity.
Batch metadata is the step's LoraPlan (kernels.lora_plan.make_lora_plan): seg_row_start[i] = o_i
(-1 = no DoRA), seg_rank[i] = r_i (0 = no DoRA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.lora_plan import LoraPlan

__all__ = ["dora_rescale", "dora_rescale_reference"]


def _check(y: Tensor, bias: Tensor | None, dora_g: Tensor, plan: LoraPlan) -> None:
    if y.dim() != 2 or y.shape[0] != plan.num_tokens:
        raise ValueError(f"y {tuple(y.shape)} does not match plan.num_tokens={plan.num_tokens}")
    if dora_g.dim() != 2 or dora_g.shape[1] != y.shape[1] or dora_g.shape[0] < plan.row_end or not dora_g.is_floating_point():
        raise ValueError(f"dora_g {tuple(dora_g.shape)} {dora_g.dtype} vs y {tuple(y.shape)}, plan needs {plan.row_end} rows")
    if bias is not None and tuple(bias.shape) != (y.shape[1],):
        raise ValueError(f"bias {tuple(bias.shape)} vs y {tuple(y.shape)}")


def dora_rescale_reference(y: Tensor, bias: Tensor | None, dora_g: Tensor, plan: LoraPlan) -> None:
    """Semantics: y[s_i:s_{i+1}] = b + f_i ⊙ (y[s_i:s_{i+1}] − b),  f_i = 1 + G[o_i]   for every segment i with o_i >= 0 and r_i > 0

    y: [T, d_out] (updated in place), bias (b): [d_out] or None (b = 0), dora_g (G): [N, d_out],
    row o_i holding g = f − 1 of the segment's adapter; y float32 or bfloat16, G any float dtype.
    Readable loop over segments computing in float32; y rounded once to its dtype.
    """
    _check(y, bias, dora_g, plan)
    b = torch.zeros(y.shape[1], device=y.device) if bias is None else bias.float()
    for i, o in enumerate(plan.seg_row_start):
        s, e, r = plan.seg_indptr[i], plan.seg_indptr[i + 1], plan.seg_rank[i]
        if o < 0 or r == 0 or e == s:
            continue  # not a DoRA segment: untouched
        f = 1 + dora_g[o].float()  # [d_out]
        y[s:e] = (b + f * (y[s:e].float() - b)).to(y.dtype)


def _rescale(ys: Tensor, f: Tensor, b: Tensor | None) -> None:
    """ys = b + f ⊙ (ys − b) in float32, in place (no copy of a float32 ys)."""
    t = ys.float()
    if b is None:
        t.mul_(f)
    else:
        t.sub_(b).mul_(f).add_(b)
    if t is not ys:
        ys.copy_(t)


def dora_rescale(y: Tensor, bias: Tensor | None, dora_g: Tensor, plan: LoraPlan) -> None:
    """Semantics: y[s_i:s_{i+1}] = b + f_i ⊙ (y[s_i:s_{i+1}] − b),  f_i = 1 + G[o_i]   for every segment i with o_i >= 0 and r_i > 0

    y: [T, d_out] (2-D, any strides: a fused layer's output slice; updated in place), bias (b):
    [d_out] or None, dora_g (G): [N, d_out]; y float32 or bfloat16, computed in float32 and rounded
    once, so the result equals dora_rescale_reference bit for bit. Replays the plan's index tensors:
    the loop path's segments one broadcast row each, the batched path's tokens in one gather of
    their adapters' rows (each token's bag starts at its adapter's first unit, o_i); nothing here
    loops per token.
    """
    if plan.path == "none":
        return
    _check(y, bias, dora_g, plan)
    b = None if bias is None else bias.float()
    for s, e, o, _ in plan.loop_segs:
        _rescale(y if e - s == plan.num_tokens else y[s:e], dora_g[o].float() + 1, b)
    if plan.num_groups == 0:
        return
    rows = plan.bag_rows.index_select(0, plan.bag_offsets)  # [T_lora]: o_i of each batched token, in bag order
    if rows.device != dora_g.device:
        rows = rows.to(dora_g.device)
    f = dora_g.index_select(0, rows).float().add_(1)  # [T_lora, d_out]
    if plan.y_range:
        _rescale(y[plan.y_range[0]:plan.y_range[1]], f, b)
        return
    y_idx = plan.y_idx if plan.y_idx.device == y.device else plan.y_idx.to(y.device)
    ys = y.index_select(0, y_idx)
    _rescale(ys, f, b)
    y.index_copy_(0, y_idx, ys)
