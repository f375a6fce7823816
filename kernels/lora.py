"""Batched segmented LoRA GEMM (Punica SGMV style) for many adapters in one batch.

Storage: per (layer, module), two row pools.
  lora_a [N_rows, d_in]  : rank-rows of A; an adapter of rank r owns rows [o, o+r).
  lora_b [N_rows, d_out] : the matching rows of B^T (PEFT lora_B.weight.T), LoRA scale folded in.
Batch: tokens grouped by adapter into segments seg_indptr[i]:seg_indptr[i+1], each with a
row_start o_i (-1 = base model, no delta) and rank r_i (mixed ranks, no padding in storage).
Pools may be stored narrower than the activations (bfloat16 pools under float32 activations,
`--lora-dtype`): half the bytes to hold and to read in a step over many adapters, while the GEMMs
still run in the activations' dtype. On the CPU, float32 activations take the C++ op
(kernels.cpu_lora) where it is built: long segments stay GEMMs, the short ones one call of the op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import cpu_lora
from kernels.lora_plan import LONG_SEGMENT_TOKENS, LoraPlan, make_bgmv_plan, make_lora_plan

__all__ = ["LoraPlan", "make_bgmv_plan", "make_lora_plan", "sgmv_lora", "sgmv_lora_reference"]


def _check(y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, plan: LoraPlan) -> None:
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != plan.num_tokens or y.shape[0] != plan.num_tokens:
        raise ValueError(f"x {tuple(x.shape)} / y {tuple(y.shape)} do not match plan.num_tokens={plan.num_tokens}")
    if (lora_a.shape[1] != x.shape[1] or lora_b.shape[1] != y.shape[1] or lora_a.shape[0] != lora_b.shape[0]
            or lora_a.shape[0] < plan.row_end):
        raise ValueError(f"pools A {tuple(lora_a.shape)} B {tuple(lora_b.shape)} vs x {tuple(x.shape)} y {tuple(y.shape)}")


def sgmv_lora_reference(y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, plan: LoraPlan) -> None:
    """Semantics: y[s_i:s_{i+1}] += x[s_i:s_{i+1}] @ A[o_i:o_i+r_i].T @ B[o_i:o_i+r_i]  for every segment i with o_i >= 0

    x: [T, d_in], y: [T, d_out], lora_a (A): [N_rows, d_in], lora_b (B): [N_rows, d_out];
    float32 or bfloat16, pools in x's dtype or narrower. Readable loop over segments accumulating
    in float32; y is updated in place, rounded once to its dtype.
    """
    _check(y, x, lora_a, lora_b, plan)
    if plan.path == "bgmv":  # one adapter per token: the same loop over tokens (reads the device rows)
        for t, (o, r) in enumerate(zip(plan.tok_row.tolist(), plan.tok_rank.tolist())):
            if o >= 0 and r > 0:
                h = x[t].float() @ lora_a[o:o + r].float().T
                y[t] = (y[t].float() + h @ lora_b[o:o + r].float()).to(y.dtype)
        return
    for i, o in enumerate(plan.seg_row_start):
        s, e, r = plan.seg_indptr[i], plan.seg_indptr[i + 1], plan.seg_rank[i]
        if o < 0 or r == 0 or e == s:
            continue  # base model only
        h = x[s:e].float() @ lora_a[o:o + r].float().T  # [n, r]
        y[s:e] = (y[s:e].float() + h @ lora_b[o:o + r].float()).to(y.dtype)


def _native_lowp_gemm() -> bool:
    # Without AVX512-BF16 / AMX, CPU bf16 GEMMs run 3-10x slower than fp32 (measured on AVX2).
    return any(bool(getattr(torch.cpu, f, lambda: False)()) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


_CPU_NATIVE_LOWP = _native_lowp_gemm()


def _upcast_gemms(x: Tensor) -> bool:
    return x.dtype in (torch.bfloat16, torch.float16) and x.is_cpu and not _CPU_NATIVE_LOWP


def sgmv_lora(y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, plan: LoraPlan) -> None:
    """Semantics: y[s_i:s_{i+1}] += x[s_i:s_{i+1}] @ A[o_i:o_i+r_i].T @ B[o_i:o_i+r_i]  for every segment i with o_i >= 0

    x: [T, d_in], y: [T, d_out] (2-D, any strides, contiguous rows are fastest; updated in place),
    lora_a (A): [N_rows, d_in], lora_b (B): [N_rows, d_out], float32 or bfloat16: x and y alike,
    the pools alike, in x's dtype or narrower (bf16 pools under fp32 activations: the rows read
    are widened). GEMMs run in x's dtype, except bf16/fp16 on CPUs without native low-precision
    GEMM, where they run in fp32 (faster there); the batched B pass reads B in place in its own
    dtype, accumulating in float32, the delta rounded once to B's dtype.
    Path and index tensors come from the plan (see LoraPlan); nothing here loops per token.
    """
    if plan.path == "none":
        return
    _check(y, x, lora_a, lora_b, plan)
    upcast = _upcast_gemms(x)
    if plan.path == "bgmv":
        bgmv_lora(y, x, lora_a, lora_b, plan, upcast)
        return
    if _cpu_short_segments(y, x, lora_a, lora_b, plan):
        return
    _segment_gemms(y, x, lora_a, lora_b, plan.loop_segs, plan.num_tokens, upcast)
    if plan.num_groups == 0:
        return
    w = batched_shrink(x, lora_a, plan, upcast)
    batched_expand(y, lora_b, w.to(lora_b.dtype) if w.dtype != lora_b.dtype else w, plan)


def _segment_gemms(y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, segs, num_tokens: int, upcast: bool) -> None:
    """One mm + addmm_ per (tok_start, tok_end, row_start, rank) segment, on pool views (no weight copy
    unless narrow pools' rows are widened)."""
    widen = lora_a.dtype != x.dtype and not upcast
    for s, e, o, r in segs:
        a, b = lora_a[o:o + r], lora_b[o:o + r]
        xs, ys = (x, y) if e - s == num_tokens else (x[s:e], y[s:e])  # slicing costs ~1.5 us each
        if upcast:
            ys.add_((xs.float() @ a.float().T) @ b.float())
        elif widen:
            ys.addmm_(xs @ a.to(x.dtype).T, b.to(x.dtype))
        else:
            ys.addmm_(xs @ a.T, b)


def _cpu_short_segments(y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, plan: LoraPlan) -> bool:
    """The CPU fast path, where the C++ op is built and the layout fits it: long segments as GEMMs on
    pool views, every short one in one call of the op. False: nothing done, the ATen path runs."""
    if not (x.is_cpu and x.dtype == torch.float32 and y.dtype == torch.float32 and x.stride(1) == 1 and y.stride(1) == 1
            and lora_a.dtype in (torch.float32, torch.bfloat16) and lora_a.is_contiguous() and lora_b.is_contiguous()
            and plan.seg_max_rank <= cpu_lora.MAX_RANK):
        return False
    op = cpu_lora.get()
    if op is None:
        return False
    if plan.cpu_segs is None:
        plan.cpu_segs = torch.tensor([sg for sg in plan.lora_segs if sg[1] - sg[0] < LONG_SEGMENT_TOKENS], dtype=torch.long).view(-1, 4)
    # prefill-sized segments: one GEMM pair each
    _segment_gemms(y, x, lora_a, lora_b, [sg for sg in plan.lora_segs if sg[1] - sg[0] >= LONG_SEGMENT_TOKENS], plan.num_tokens, False)
    if plan.cpu_segs.numel():
        op(y, x, lora_a, lora_b, plan.cpu_segs)
    return True


def bgmv_lora(y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, plan: LoraPlan, upcast: bool) -> None:
    """The bgmv path: every token's rank rows gathered ([T, R, d] copies: the CUDA-graph decode path of a
    GPU without triton, where T is a decode batch), masked past its rank, two batched GEMVs."""
    a, b = lora_a[plan.bgmv_rows], lora_b[plan.bgmv_rows]  # [T, R, d_in], [T, R, d_out]
    # A masked slot reads pool row 0, another adapter's: select zeros there (where, not a multiply by the
    # mask, since inf x 0 is NaN), so no adapter's numbers reach another tenant's tokens.
    b = torch.where(plan.bgmv_mask.unsqueeze(2), b, 0)
    xs = x.unsqueeze(2)
    if upcast:
        a, b, xs = a.float(), b.float(), xs.float()
    elif a.dtype != x.dtype:  # narrow pools
        a, b = a.to(x.dtype), b.to(x.dtype)
    h = torch.where(plan.bgmv_mask, torch.bmm(a, xs).squeeze(2), 0)  # [T, R]
    y.add_(torch.bmm(h.unsqueeze(1).to(b.dtype), b).squeeze(1).to(y.dtype))


def batched_shrink(x: Tensor, rows_pool: Tensor, plan: LoraPlan, upcast: bool) -> Tensor:
    """The plan's batched A pass: h[g, l, j] = x[slot (g, l)] · rows_pool[a_rows[g, j]], returned as the
    [E] real entries in bag order (padded token slots and rank rows dropped). Shared by sgmv_lora and s2ft_row."""
    G, L, R = plan.num_groups, plan.group_len, plan.max_rank
    xs = x[plan.x_range[0]:plan.x_range[1]] if plan.x_range else x.index_select(0, plan.x_idx)
    a = rows_pool.index_select(0, plan.a_rows)  # reads the pool's bytes once, in its own dtype
    if upcast:
        xs, a = xs.float(), a.float()
    elif a.dtype != xs.dtype:  # narrow pool: the gathered rows widened, the GEMM in x's dtype
        a = a.to(xs.dtype)
    h = torch.bmm(xs.unflatten(0, (G, L)), a.view(G, R, -1).transpose(1, 2))  # [G, L, R]
    return h.view(-1) if plan.h_pos is None else h.view(-1).index_select(0, plan.h_pos)


def batched_expand(y: Tensor, rows_pool: Tensor, w: Tensor, plan: LoraPlan) -> None:
    """The plan's batched B pass: y[t] += Σ_k w[k] · rows_pool[bag_rows[k]] over token t's bag, reading
    the pool rows in place (no gathered copy). Shared by sgmv_lora and s2ft_col."""
    # ATen op directly (F.embedding_bag adds ~10 us of Python checks); args: weight, indices, offsets,
    # scale_grad_by_freq, mode=0 (sum), sparse, per_sample_weights, include_last_offset, padding_idx.
    out = torch.embedding_bag(rows_pool, plan.bag_rows, plan.bag_offsets, False, 0, False, w, False, None)[0]
    if out.dtype != y.dtype:  # a narrow pool's delta
        out = out.to(y.dtype)
    if plan.y_range:
        y[plan.y_range[0]:plan.y_range[1]].add_(out)
    else:
        y.index_add_(0, plan.y_idx, out)
