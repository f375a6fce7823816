"""Expert-routed LoRA rows (DecoderLayer._routed_experts): one LoRA delta per gathered (token, expert) row.

A routed-experts adapter stores each expert as a LoRA of the pools (expert e of rank r owns rows
[expert_row_start + e*r, ... + r)). The layer gathers one row per (token, chosen expert), so with
top-k a token appears in k rows; each row carries its own pool row start, rank and, optionally, a
routing weight. Per-row indices make this BGMV: no segment metadata, no host sync. In
_routed_experts terms (rows sorted by expert, e_sorted = flat[order], r = expert rank):
    routed_lora_triton(gu[:, slot.out_start:slot.out_end], hr, pool_a, pool_b,
                       expert_row_start + e_sorted * r, torch.full_like(e_sorted, r), max_rank=r)
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.triton.lora import bgmv_expand, bgmv_shrink

__all__ = ["routed_lora_triton", "routed_lora_reference"]


def _check(y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, row_start: Tensor, rank: Tensor,
           row_weight: Tensor | None) -> None:
    n = x.shape[0]
    if x.dim() != 2 or y.dim() != 2 or y.shape[0] != n:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must be 2-D with the same row count")
    if lora_a.shape[1] != x.shape[1] or lora_b.shape[1] != y.shape[1] or lora_a.shape[0] != lora_b.shape[0]:
        raise ValueError(f"pools A {tuple(lora_a.shape)} B {tuple(lora_b.shape)} vs x {tuple(x.shape)} y {tuple(y.shape)}")
    for name, t in (("row_start", row_start), ("rank", rank)) + ((("row_weight", row_weight),) if row_weight is not None else ()):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if row_start.is_floating_point() or rank.is_floating_point():
        raise ValueError("row_start and rank must be integer tensors")


def routed_lora_reference(y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, row_start: Tensor, rank: Tensor,
                          row_weight: Tensor | None = None, max_rank: int | None = None) -> None:
    """Semantics: y[i] += w_i * (x[i] @ A[o_i:o_i+r_i].T @ B[o_i:o_i+r_i])  for every row i with o_i = row_start[i] >= 0

    x: [n, d_in] (rows already gathered, one per (token, expert)), y: [n, d_out] updated in place,
    lora_a [N_rows, d_in], lora_b [N_rows, d_out], row_start/rank: [n] int, row_weight: [n] or None
    (w_i = 1). max_rank: an upper bound of rank (unused here, for the Triton op's signature).
    Readable loop over rows accumulating in fp32, rounded once into y.
    """
    _check(y, x, lora_a, lora_b, row_start, rank, row_weight)
    weights = row_weight.float().tolist() if row_weight is not None else [1.0] * x.shape[0]
    for i, (o, r, w) in enumerate(zip(row_start.tolist(), rank.tolist(), weights)):
        if o < 0 or r == 0:
            continue
        delta = (x[i:i + 1].float() @ lora_a[o:o + r].float().T) @ lora_b[o:o + r].float()
        y[i:i + 1] = (y[i:i + 1].float() + w * delta).to(y.dtype)


def routed_lora_triton(y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, row_start: Tensor, rank: Tensor,
                       row_weight: Tensor | None = None, max_rank: int | None = None) -> None:
    """Semantics: y[i] += w_i * (x[i] @ A[o_i:o_i+r_i].T @ B[o_i:o_i+r_i])  for every row i with o_i = row_start[i] >= 0

    Same arguments as routed_lora_reference; tensors on the kernels' device. max_rank (>= every
    rank; the expert rank in _routed_experts) sizes the rank tile; None reads rank.max(), a host
    sync. BGMV shrink into an fp32 [n, max_rank] buffer, then BGMV expand scaled by w_i.
    """
    _check(y, x, lora_a, lora_b, row_start, rank, row_weight)
    n = x.shape[0]
    if n == 0:
        return
    if max_rank is None:
        max_rank = int(rank.max())
    if max_rank <= 0:
        return
    v = torch.zeros(n, max_rank, dtype=torch.float32, device=x.device)
    bgmv_shrink(x, lora_a, row_start, rank, max_rank, v)
    bgmv_expand(y, v, lora_b, row_start, rank, max_rank, weight=row_weight)
