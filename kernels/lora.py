"""Batched segmented LoRA GEMM (Punica SGMV style) for many adapters in one batch.

Storage: per (layer, module), two row pools.
  lora_a [N_rows, d_in]  : rank-rows of A; an adapter of rank r owns rows [o, o+r).
  lora_b [N_rows, d_out] : the matching rows of B^T (PEFT lora_B.weight.T), LoRA scale folded in.
Batch: tokens grouped by adapter into segments seg_indptr[i]:seg_indptr[i+1], each with a
row_start o_i (-1 = base model, no delta) and rank r_i (mixed ranks, no padding in storage).

A LoraPlan is built once per engine step; sgmv_lora then runs a fixed, short sequence of
torch ops per (layer, module) call, with no Python loop over segments on the decode path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["LoraPlan", "make_lora_plan", "sgmv_lora", "sgmv_lora_reference"]

# Plan path choice (measured on a 2-core AVX2 CPU, d=576, rank 16, see kernels/bench_cpu.py):
# one addmm pair on pool views costs ~20 us of fixed overhead per segment, a batched
# gather+bmm call ~60-80 us total, so segments averaging >= this many tokens take the loop.
LOOP_MIN_MEAN_TOKENS = 16
# Relative cost of one gathered weight row vs. one padded token slot when picking the
# chunk length of the batched path (both move ~d_in + d_out elements).
_ROW_VS_TOKEN_COST = 1.0


@dataclass(slots=True)
class LoraPlan:
    """Per-step adapter metadata, built ONCE per engine step and reused by every (layer, module) call.

    path: "none" (every segment base), "loop" (addmm_ per segment on pool views; also used
    for a single LoRA segment) or "batched" (gather + bmm over G groups of L token slots and
    R rank rows; long segments are split into several groups of <= L tokens).
    """

    num_tokens: int
    seg_indptr: list[int]
    seg_row_start: list[int]
    seg_rank: list[int]
    path: str
    # LoRA segments as (tok_start, tok_end, row_start, rank); drives the loop path.
    lora_segs: tuple[tuple[int, int, int, int], ...] = ()
    # Batched path: G groups x L token slots x R rank rows.
    num_groups: int = 0
    group_len: int = 0
    max_rank: int = 0
    tok_range: tuple[int, int] | None = None  # x[lo:hi] is the [G*L] slot order: no gather, slice add
    tok_idx: Tensor | None = field(default=None, repr=False)  # [G*L] token of each slot (pad slots repeat a token of the group)
    row_idx: Tensor | None = field(default=None, repr=False)  # [G*R] pool row of each rank slot (pad rows repeat row o_i)
    pad_mask: Tensor | None = field(default=None, repr=False)  # bool [G, L or 1, R]: h entries to zero (padded slots/ranks)


def make_lora_plan(
    seg_indptr: Sequence[int],
    seg_row_start: Sequence[int],
    seg_rank: Sequence[int],
    device: torch.device | str | None = None,
) -> LoraPlan:
    """Validate segment metadata and precompute every index tensor the fast op needs."""
    indptr, starts, ranks = [int(v) for v in seg_indptr], [int(v) for v in seg_row_start], [int(v) for v in seg_rank]
    n_seg = len(starts)
    if len(indptr) != n_seg + 1 or len(ranks) != n_seg:
        raise ValueError(f"need len(seg_indptr) == S+1 == len(seg_row_start)+1 == len(seg_rank)+1, got "
                         f"{len(indptr)}, {n_seg}, {len(ranks)}")
    if indptr[0] != 0 or any(b < a for a, b in zip(indptr, indptr[1:])):
        raise ValueError(f"seg_indptr must start at 0 and be non-decreasing: {indptr}")
    if any(o < -1 for o in starts) or any(r < 0 for r, o in zip(ranks, starts) if o >= 0):
        raise ValueError("seg_row_start must be >= -1 and seg_rank >= 0")
    plan = LoraPlan(num_tokens=indptr[-1], seg_indptr=indptr, seg_row_start=starts, seg_rank=ranks, path="none")
    # Empty segments and rank-0 adapters contribute nothing: drop them here, once.
    segs = tuple((indptr[i], indptr[i + 1], starts[i], ranks[i]) for i in range(n_seg)
                 if starts[i] >= 0 and ranks[i] > 0 and indptr[i + 1] > indptr[i])
    plan.lora_segs = segs
    if not segs:
        return plan
    lens = [e - s for s, e, _, _ in segs]
    if len(segs) == 1 or sum(lens) >= LOOP_MIN_MEAN_TOKENS * len(segs):
        plan.path = "loop"
        return plan
    _build_batched(plan, segs, lens, device)
    return plan


def _pick_group_len(lens: list[int], max_rank: int) -> int:
    # Long (hot-adapter) segments would pad every group to their length; splitting them into
    # chunks of L tokens trades padded token slots for re-gathered weight rows. Minimise both.
    def cost(L: int) -> float:
        groups = sum(-(-n // L) for n in lens)
        return groups * (L + _ROW_VS_TOKEN_COST * max_rank)

    candidates = set(lens) | {1 << k for k in range(max(lens).bit_length())}
    return min(sorted(c for c in candidates if c <= max(lens)), key=lambda L: (cost(L), -L))


def _build_batched(plan: LoraPlan, segs: tuple[tuple[int, int, int, int], ...], lens: list[int],
                   device: torch.device | str | None) -> None:
    R = max(r for _, _, _, r in segs)
    L = _pick_group_len(lens, R)
    tok_idx: list[int] = []
    row_idx: list[int] = []
    tok_pad: list[list[bool]] = []  # per group, per slot
    rank_pad: list[list[bool]] = []  # per group, per rank row
    for s, e, o, r in segs:
        rows = [o + k for k in range(r)] + [o] * (R - r)
        for c in range(s, e, L):
            n = min(L, e - c)
            tok_idx += [c + k for k in range(n)] + [c] * (L - n)
            row_idx += rows
            tok_pad.append([False] * n + [True] * (L - n))
            rank_pad.append([False] * r + [True] * (R - r))
    G = len(tok_pad)
    plan.path, plan.num_groups, plan.group_len, plan.max_rank = "batched", G, L, R
    plan.row_idx = torch.tensor(row_idx, dtype=torch.long, device=device)
    any_tok_pad = any(any(g) for g in tok_pad)
    if any_tok_pad or any(any(g) for g in rank_pad):
        m = torch.tensor(rank_pad, dtype=torch.bool).unsqueeze(1)  # [G, 1, R]
        if any_tok_pad:  # zeroing h of padded slots makes their output rows exactly 0
            m = m | torch.tensor(tok_pad, dtype=torch.bool).unsqueeze(2)  # [G, L, R]
        plan.pad_mask = m.to(device)
    lo = tok_idx[0]
    if tok_idx == list(range(lo, lo + len(tok_idx))):
        plan.tok_range = (lo, lo + len(tok_idx))  # LoRA tokens contiguous, no padding
    else:
        plan.tok_idx = torch.tensor(tok_idx, dtype=torch.long, device=device)


def _check(y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, plan: LoraPlan) -> None:
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != plan.num_tokens or y.shape[0] != plan.num_tokens:
        raise ValueError(f"x {tuple(x.shape)} / y {tuple(y.shape)} do not match plan.num_tokens={plan.num_tokens}")
    if lora_a.shape[1] != x.shape[1] or lora_b.shape[1] != y.shape[1] or lora_a.shape[0] != lora_b.shape[0]:
        raise ValueError(f"pool shapes A {tuple(lora_a.shape)} B {tuple(lora_b.shape)} vs x {tuple(x.shape)} y {tuple(y.shape)}")


def sgmv_lora_reference(y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, plan: LoraPlan) -> None:
    """Semantics: y[s_i:s_{i+1}] += x[s_i:s_{i+1}] @ A[o_i:o_i+r_i].T @ B[o_i:o_i+r_i]  for every segment i with o_i >= 0

    x: [T, d_in], y: [T, d_out], lora_a: [N_rows, d_in], lora_b: [N_rows, d_out]; float32 or
    bfloat16, pools in x's dtype. Readable loop over segments, accumulating in float32;
    the delta is added into y in place (rounded once to y's dtype).
    """
    _check(y, x, lora_a, lora_b, plan)
    for i, o in enumerate(plan.seg_row_start):
        s, e, r = plan.seg_indptr[i], plan.seg_indptr[i + 1], plan.seg_rank[i]
        if o < 0 or r == 0 or e == s:
            continue  # base model only
        h = x[s:e].float() @ lora_a[o:o + r].float().T  # [n, r]
        y[s:e] = (y[s:e].float() + h @ lora_b[o:o + r].float()).to(y.dtype)


def _lowp_native(device: torch.device) -> bool:
    # Without AVX512-BF16/AMX, CPU bf16 GEMMs run ~7-10x slower than fp32 (measured on AVX2).
    if device.type != "cpu":
        return True
    cpu = torch.cpu
    return any(bool(getattr(cpu, f, lambda: False)()) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


_LOWP_NATIVE_CPU = _lowp_native(torch.device("cpu"))


def _compute_dtype(x: Tensor) -> torch.dtype:
    if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" and not _LOWP_NATIVE_CPU:
        return torch.float32
    return x.dtype


def sgmv_lora(y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, plan: LoraPlan) -> None:
    """Semantics: y[s_i:s_{i+1}] += x[s_i:s_{i+1}] @ A[o_i:o_i+r_i].T @ B[o_i:o_i+r_i]  for every segment i with o_i >= 0

    x: [T, d_in], y: [T, d_out] (any strides, contiguous is fastest; y updated in place),
    lora_a: [N_rows, d_in], lora_b: [N_rows, d_out] in x's dtype (float32 or bfloat16).
    Computes in x's dtype, except bf16/fp16 on CPUs without native bf16 GEMM (upcast to fp32,
    which is several times faster there). Path chosen by the plan: see LoraPlan.
    """
    if plan.path == "none":
        return
    _check(y, x, lora_a, lora_b, plan)
    cdt = _compute_dtype(x)
    if plan.path == "loop":
        for s, e, o, r in plan.lora_segs:
            xs, a, b = x[s:e], lora_a[o:o + r], lora_b[o:o + r]  # views: no weight copy
            if cdt == y.dtype:
                y[s:e].addmm_(xs @ a.T, b)
            else:
                y[s:e].add_((xs.to(cdt) @ a.to(cdt).T) @ b.to(cdt))
        return
    G, L, R = plan.num_groups, plan.group_len, plan.max_rank
    if plan.tok_range is not None:
        xs = x[plan.tok_range[0]:plan.tok_range[1]]
    else:
        xs = x.index_select(0, plan.tok_idx)
    a = lora_a.index_select(0, plan.row_idx)
    if cdt != x.dtype:
        xs, a = xs.to(cdt), a.to(cdt)
    h = torch.bmm(xs.unflatten(0, (G, L)), a.view(G, R, -1).transpose(1, 2))  # [G, L, R]
    if plan.pad_mask is not None:
        h.masked_fill_(plan.pad_mask, 0)
    b = lora_b.index_select(0, plan.row_idx)
    if cdt != b.dtype:
        b = b.to(cdt)
    out = torch.bmm(h, b.view(G, R, -1)).view(G * L, -1)  # [G*L, d_out]
    if plan.tok_range is not None:
        y[plan.tok_range[0]:plan.tok_range[1]].add_(out)
    else:  # padded slots carry exact zeros, so they may land on any token
        y.index_add_(0, plan.tok_idx, out if out.dtype == y.dtype else out.to(y.dtype))
