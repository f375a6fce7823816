"""Triton SGMV / BGMV kernels for batched multi-adapter LoRA (Punica style), same semantics as kernels.lora.

Storage and batch metadata are those of kernels.lora: row pools lora_a [N_rows, d_in], lora_b
[N_rows, d_out] (scale folded into B), and a LoraPlan of segments (first token, row_start o_i, rank r_i).

Two passes through an fp32 buffer v [T, max_rank]:
  shrink  v[t, :r] = x[t] @ A[o:o+r].T
  expand  y[t]    += v[t, :r] @ B[o:o+r]
SGMV (prefill-like, long segments): one program per (segment, token block, rank chunk / out block),
tl.dot tiles; a segment's A/B rows are read once per token block. BGMV (decode-like, short segments):
one program per (token, rank chunk x k-split / out block) with that token's row start and rank,
vector FMA (a 1-row tile would waste a tensor-core MMA). Mixed ranks are handled by masking rank rows
>= r_i. No tile grows with the rank: ranks above RANK_BUCKET_CAP (64) are split into rank chunks
(a grid axis in the shrinks, a loop in the expands), so a rank-256 adapter keeps the register tile
of a rank-64 one. Autotune keys and the start-up warmup: kernels.triton.autotune.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.lora import _check
from kernels.lora_plan import LoraPlan
from kernels.triton.autotune import AUTOTUNE_OPTIONS, INTERPRET, configs, rank_bucket, register_prune, token_bucket

__all__ = ["sgmv_lora_triton", "sgmv_shrink", "sgmv_expand", "bgmv_shrink", "bgmv_expand", "plan_meta", "stage_plan_meta",
           "PlanMeta", "BGMV_MAX_SEG_LEN", "INTERPRET"]

INTERPRET_DOT = tl.constexpr(INTERPRET)  # read as a compile-time constant inside kernels

# Plans whose longest LoRA segment has at most this many tokens run BGMV. A guess, not yet swept on
# a GPU: below tl.dot's 16-row minimum tile most of an SGMV MMA would multiply masked rows, and
# BGMV's per-token reads of A/B rows mostly hit L2 for such short segments.
BGMV_MAX_SEG_LEN = 4


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (tl.dot's default is TF32 on NVIDIA, ~1e-3 relative error);
    # 16-bit inputs use tensor cores either way.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation. Under the interpreter the operands go through fp32: its
    tl.dot multiplies bf16 tensors as their raw uint16 storage (triton 3.9)."""
    if INTERPRET_DOT:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


def len_bucket(meta: "PlanMeta") -> int:
    """The token part of a segment-tiled kernel's autotune key: the bucket of the longest segment, so
    a new longest segment each engine step does not trigger a new benchmark."""
    return token_bucket(meta.max_seg_len)


# --------------------------------------------------------------------------------------------------
# Plan metadata: built once per plan and device, cached on the plan.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlanMeta:
    """Device metadata of a LoraPlan for the Triton kernels (int32).

    Segments are the plan's LoRA segments only (non-empty, row_start >= 0, rank > 0):
      seg_start/seg_len/seg_row/seg_rank [S]. Per token: tok_row [T] (-1 = base) and tok_rank [T].
    """

    device: torch.device
    num_segs: int
    max_seg_len: int
    max_rank: int
    seg_start: Tensor
    seg_len: Tensor
    seg_row: Tensor
    seg_rank: Tensor
    tok_row: Tensor
    tok_rank: Tensor


def _meta_arrays(plan: LoraPlan) -> array:
    """seg_start, seg_len, seg_row, seg_rank [S] then tok_row, tok_rank [T], flat."""
    segs = plan.lora_segs
    T = plan.num_tokens
    tok_row, tok_rank = array("i", [-1]) * T, array("i", [0]) * T
    for s, e, o, r in segs:
        tok_row[s:e] = array("i", [o]) * (e - s)
        tok_rank[s:e] = array("i", [r]) * (e - s)
    flat = array("i", [s for s, _, _, _ in segs])
    flat.extend(e - s for s, e, _, _ in segs)
    flat.extend(o for _, _, o, _ in segs)
    flat.extend(r for _, _, _, r in segs)
    flat.extend(tok_row)
    flat.extend(tok_rank)
    return flat


def _set_meta(plan: LoraPlan, packed: Tensor) -> PlanMeta:
    segs, T, S = plan.lora_segs, plan.num_tokens, len(plan.lora_segs)
    meta = PlanMeta(device=packed.device, num_segs=S, max_seg_len=max((e - s for s, e, _, _ in segs), default=0),
                    max_rank=max((r for *_, r in segs), default=0),
                    seg_start=packed[0:S], seg_len=packed[S:2 * S], seg_row=packed[2 * S:3 * S],
                    seg_rank=packed[3 * S:4 * S], tok_row=packed[4 * S:4 * S + T], tok_rank=packed[4 * S + T:])
    plan.triton_meta = meta
    return meta


def plan_meta(plan: LoraPlan, device: torch.device) -> PlanMeta:
    """The plan's PlanMeta on `device`: staged with the step's index tensors (stage_plan_meta), or built
    on first use (one host->device copy), cached on the plan."""
    meta = plan.triton_meta
    if isinstance(meta, PlanMeta) and meta.device == device:
        return meta
    flat = _meta_arrays(plan)
    packed = (torch.frombuffer(flat, dtype=torch.int32) if len(flat) else torch.empty(0, dtype=torch.int32))
    return _set_meta(plan, packed.to(device, copy=True))


def stage_plan_meta(plan: LoraPlan, staging) -> None:
    """Put the plan's PlanMeta in the step's one host->device copy (kernels.staging.HostStaging)."""
    if plan.path not in ("none", "bgmv"):
        staging.add(_meta_arrays(plan), lambda packed: _set_meta(plan, packed), dtype=torch.int32)


# --------------------------------------------------------------------------------------------------
# SGMV: segment-tiled shrink and expand. BLOCK_R = the rank bucket (<= RANK_BUCKET_CAP): the shrink
# splits larger ranks over a grid axis, the expand loops over them.
# --------------------------------------------------------------------------------------------------

# Elements of the tiles a program keeps live (see autotune.fit_register_budget): the accumulator and
# the operand tiles of the MMA.
def _sgmv_shrink_tile(a: dict) -> int:
    return a["BLOCK_M"] * a["BLOCK_R"] + (a["BLOCK_M"] + a["BLOCK_R"]) * a["BLOCK_K"]


def _sgmv_expand_tile(a: dict) -> int:
    return a["BLOCK_M"] * a["BLOCK_N"] + (a["BLOCK_M"] + a["BLOCK_N"]) * a["BLOCK_R"]


@triton.autotune(
    configs=configs(dict(BLOCK_M=16, BLOCK_K=32, SPLIT_K=1),
                    [dict(BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=sk, num_warps=nw)
                     for bm, bk, nw in ((16, 64, 4), (16, 128, 4), (64, 64, 4), (64, 64, 8), (64, 128, 8)) for sk in (1, 4)]),
    key=["d_in", "rank_bucket", "len_bucket"], reset_to_zero=["v_ptr"], prune_configs_by=register_prune(_sgmv_shrink_tile),
    **AUTOTUNE_OPTIONS)
@triton.jit(do_not_specialize=["rank_bucket", "len_bucket"])
def _sgmv_shrink_kernel(x_ptr, a_ptr, v_ptr, seg_start_ptr, seg_len_ptr, seg_row_ptr, seg_rank_ptr,
                        d_in, rank_bucket, len_bucket, sxm, sxk, sam, sak, svm,
                        BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_r = tl.program_id(2) // SPLIT_K  # rank chunk
    pid_k = tl.program_id(2) % SPLIT_K
    n = tl.load(seg_len_ptr + seg)
    rank = tl.load(seg_rank_ptr + seg)
    if pid_m * BLOCK_M >= n or pid_r * BLOCK_R >= rank:
        return  # the grid covers the longest segment and the largest rank
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_mask, r_mask = offs_m < n, offs_r < rank
    tok = (tl.load(seg_start_ptr + seg) + offs_m).to(tl.int64)
    rows = (tl.load(seg_row_ptr + seg) + offs_r).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, d_in, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < d_in
        xt = tl.load(x_ptr + tok[:, None] * sxm + offs_k[None, :] * sxk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_ptr + rows[None, :] * sam + offs_k[:, None] * sak, mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        acc = mma(xt, at.to(xt.dtype), acc, PRECISION)
    ptrs = v_ptr + tok[:, None] * svm + offs_r[None, :]
    mask = m_mask[:, None] & r_mask[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc, mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


@triton.autotune(
    configs=configs(dict(BLOCK_M=16, BLOCK_N=64),
                    [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=nw)
                     for bm, bn, nw in ((16, 64, 4), (16, 128, 4), (16, 256, 4), (64, 64, 4), (64, 64, 8), (64, 128, 8),
                                        (64, 256, 8))]),
    key=["d_out", "rank_bucket", "len_bucket"], restore_value=["y_ptr"], prune_configs_by=register_prune(_sgmv_expand_tile),
    **AUTOTUNE_OPTIONS)
@triton.jit(do_not_specialize=["rank_bucket", "len_bucket"])
def _sgmv_expand_kernel(v_ptr, b_ptr, y_ptr, seg_start_ptr, seg_len_ptr, seg_row_ptr, seg_rank_ptr,
                        d_out, rank_bucket, len_bucket, svm, sbm, sbn, sym, syn,
                        BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    n = tl.load(seg_len_ptr + seg)
    if pid_m * BLOCK_M >= n:
        return
    rank = tl.load(seg_rank_ptr + seg)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < n, offs_n < d_out
    tok = (tl.load(seg_start_ptr + seg) + offs_m).to(tl.int64)
    row0 = tl.load(seg_row_ptr + seg)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # rank chunks
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        rows = (row0 + offs_r).to(tl.int64)
        vt = tl.load(v_ptr + tok[:, None] * svm + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        bt = tl.load(b_ptr + rows[:, None] * sbm + offs_n[None, :] * sbn, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        # v is rounded to B's dtype for the MMA, as the torch fast op rounds h
        acc = mma(vt.to(bt.dtype), bt, acc, PRECISION)
    ptrs = y_ptr + tok[:, None] * sym + offs_n[None, :] * syn
    mask = m_mask[:, None] & n_mask[None, :]
    yt = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, (yt.to(tl.float32) + acc).to(yt.dtype), mask=mask)


def sgmv_shrink(x: Tensor, lora_a: Tensor, meta: PlanMeta, v: Tensor) -> None:
    """Semantics: v[s:s+n, :r] (+)= x[s:s+n] @ A[o:o+r].T  for every LoRA segment (s, n, o, r) of meta

    v: [T, >= meta.max_rank] float32, zero-filled (split-K programs accumulate into it).
    """
    if meta.num_segs == 0:
        return
    BLOCK_R = rank_bucket(meta.max_rank)
    d_in = x.shape[1]
    grid = lambda META: (meta.num_segs, triton.cdiv(meta.max_seg_len, META["BLOCK_M"]),  # noqa: E731
                         triton.cdiv(meta.max_rank, BLOCK_R) * META["SPLIT_K"])
    _sgmv_shrink_kernel[grid](x, lora_a, v, meta.seg_start, meta.seg_len, meta.seg_row, meta.seg_rank,
                              d_in, BLOCK_R, len_bucket(meta), x.stride(0), x.stride(1),
                              lora_a.stride(0), lora_a.stride(1), v.stride(0),
                              BLOCK_R=BLOCK_R, PRECISION=dot_precision(x.dtype))


def sgmv_expand(y: Tensor, v: Tensor, lora_b: Tensor, meta: PlanMeta) -> None:
    """Semantics: y[s:s+n] += v[s:s+n, :r] @ B[o:o+r]  for every LoRA segment (s, n, o, r) of meta (in place)"""
    if meta.num_segs == 0:
        return
    BLOCK_R = rank_bucket(meta.max_rank)
    d_out = y.shape[1]
    grid = lambda META: (meta.num_segs, triton.cdiv(meta.max_seg_len, META["BLOCK_M"]),  # noqa: E731
                         triton.cdiv(d_out, META["BLOCK_N"]))
    _sgmv_expand_kernel[grid](v, lora_b, y, meta.seg_start, meta.seg_len, meta.seg_row, meta.seg_rank,
                              d_out, BLOCK_R, len_bucket(meta), v.stride(0),
                              lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1),
                              BLOCK_R=BLOCK_R, PRECISION=dot_precision(lora_b.dtype))


# --------------------------------------------------------------------------------------------------
# BGMV: one (row start, rank) per token, vector FMA, rank in chunks of BLOCK_R (tuned, <= the bucket).
# --------------------------------------------------------------------------------------------------


def _bgmv_shrink_tile(a: dict) -> int:
    return 2 * a["BLOCK_R"] * a["BLOCK_K"]  # the [R, K] accumulator and the A tile


def _bgmv_expand_tile(a: dict) -> int:
    return a["BLOCK_R"] * a["BLOCK_N"] + a["BLOCK_N"]  # the B tile and the [N] accumulator


@triton.autotune(
    configs=configs(dict(BLOCK_R=32, BLOCK_K=32, SPLIT_K=2),  # split-K under the interpreter: tests the atomic path
                    [dict(BLOCK_R=br, BLOCK_K=bk, SPLIT_K=sk, num_warps=nw)
                     for br, bk, nw in ((16, 128, 4), (16, 256, 4), (32, 128, 4), (64, 64, 4), (16, 512, 8), (32, 256, 8),
                                        (64, 128, 8)) for sk in (1, 4, 16)]),
    key=["d_in", "rank_bucket", "tok_bucket"], reset_to_zero=["v_ptr"], prune_configs_by=register_prune(_bgmv_shrink_tile),
    **AUTOTUNE_OPTIONS)
@triton.jit(do_not_specialize=["rank_bucket", "tok_bucket"])
def _bgmv_shrink_kernel(x_ptr, a_ptr, v_ptr, tok_row_ptr, tok_rank_ptr, d_in, rank_bucket, tok_bucket,
                        sxm, sxk, sam, sak, svm, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1) // SPLIT_K  # rank chunk: a program's tile is [BLOCK_R, BLOCK_K] whatever the rank
    pid_k = tl.program_id(1) % SPLIT_K
    row0 = tl.load(tok_row_ptr + t)
    if row0 < 0:
        return  # base-model token
    rank = tl.load(tok_rank_ptr + t)
    if pid_r * BLOCK_R >= rank:
        return  # the grid covers the batch's largest rank
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    rows = (row0 + offs_r).to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)  # reduced once after the loop
    for k0 in range(pid_k * BLOCK_K, d_in, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < d_in
        xv = tl.load(x_ptr + t * sxm + offs_k * sxk, mask=k_mask, other=0.0).to(tl.float32)
        at = tl.load(a_ptr + rows[:, None] * sam + offs_k[None, :] * sak, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        acc += at.to(tl.float32) * xv[None, :]
    out = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        tl.store(v_ptr + t * svm + offs_r, out, mask=r_mask)
    else:
        tl.atomic_add(v_ptr + t * svm + offs_r, out, mask=r_mask)


@triton.autotune(
    configs=configs(dict(BLOCK_R=32, BLOCK_N=64),
                    [dict(BLOCK_R=br, BLOCK_N=bn, num_warps=nw) for br in (16, 32, 64) for bn in (64, 128, 256)
                     for nw in (2, 4)]),
    key=["d_out", "rank_bucket", "tok_bucket"], restore_value=["y_ptr"], prune_configs_by=register_prune(_bgmv_expand_tile),
    **AUTOTUNE_OPTIONS)
@triton.jit(do_not_specialize=["rank_bucket", "tok_bucket"])
def _bgmv_expand_kernel(v_ptr, b_ptr, y_ptr, tok_row_ptr, tok_rank_ptr, d_out, rank_bucket, tok_bucket,
                        svm, sbm, sbn, sym, syn, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    row0 = tl.load(tok_row_ptr + t)
    if row0 < 0:
        return
    rank = tl.load(tok_rank_ptr + t)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < d_out
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):  # rank chunks
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        rows = (row0 + offs_r).to(tl.int64)
        vt = tl.load(v_ptr + t * svm + offs_r, mask=r_mask, other=0.0)
        bt = tl.load(b_ptr + rows[:, None] * sbm + offs_n[None, :] * sbn, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.sum(vt[:, None] * bt.to(tl.float32), axis=0)
    ptrs = y_ptr + t * sym + offs_n * syn
    yt = tl.load(ptrs, mask=n_mask, other=0.0)
    tl.store(ptrs, (yt.to(tl.float32) + acc).to(yt.dtype), mask=n_mask)


def bgmv_shrink(x: Tensor, lora_a: Tensor, tok_row: Tensor, tok_rank: Tensor, max_rank: int, v: Tensor) -> None:
    """Semantics: v[t, :r_t] (+)= x[t] @ A[o_t:o_t+r_t].T  for every t with o_t = tok_row[t] >= 0, r_t = tok_rank[t]

    v: [T, >= max_rank] float32, zero-filled (split-K programs accumulate into it). max_rank >= every r_t.
    """
    T, d_in = x.shape
    if T == 0 or max_rank == 0:
        return
    grid = lambda META: (T, triton.cdiv(max_rank, META["BLOCK_R"]) * META["SPLIT_K"])  # noqa: E731
    _bgmv_shrink_kernel[grid](x, lora_a, v, tok_row, tok_rank, d_in, rank_bucket(max_rank), token_bucket(T),
                              x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), v.stride(0))


def bgmv_expand(y: Tensor, v: Tensor, lora_b: Tensor, tok_row: Tensor, tok_rank: Tensor, max_rank: int) -> None:
    """Semantics: y[t] += v[t, :r_t] @ B[o_t:o_t+r_t]  for every t with o_t = tok_row[t] >= 0 (in place)"""
    T, d_out = y.shape
    if T == 0 or max_rank == 0:
        return
    grid = lambda META: (T, triton.cdiv(d_out, META["BLOCK_N"]))  # noqa: E731
    _bgmv_expand_kernel[grid](v, lora_b, y, tok_row, tok_rank, d_out, rank_bucket(max_rank), token_bucket(T),
                              v.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1))


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------


def shrink_by_plan(x: Tensor, pool: Tensor, plan: LoraPlan) -> tuple[PlanMeta, Tensor, bool]:
    """The A pass of a plan: (meta, v [T, max_rank] float32, bgmv?), BGMV when every segment is short."""
    meta = plan_meta(plan, x.device)
    v = torch.zeros(plan.num_tokens, max(meta.max_rank, 1), dtype=torch.float32, device=x.device)
    bgmv = meta.max_seg_len <= BGMV_MAX_SEG_LEN
    if bgmv:
        bgmv_shrink(x, pool, meta.tok_row, meta.tok_rank, meta.max_rank, v)
    else:
        sgmv_shrink(x, pool, meta, v)
    return meta, v, bgmv


def sgmv_lora_triton(y: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, plan: LoraPlan) -> None:
    """Semantics: y[s_i:s_{i+1}] += x[s_i:s_{i+1}] @ A[o_i:o_i+r_i].T @ B[o_i:o_i+r_i]  for every segment i with o_i >= 0

    Same signature and contract as kernels.lora.sgmv_lora: x [T, d_in], y [T, d_out] (any strides,
    updated in place), lora_a [N_rows, d_in], lora_b [N_rows, d_out]; fp32, bf16 or fp16; tensors on
    the device the kernels run on (CUDA, or CPU under TRITON_INTERPRET=1). Accumulates in fp32; the
    shrink result is kept in fp32 (BGMV) or rounded to B's dtype for the expand MMA (SGMV).
    BGMV when the plan's longest LoRA segment has <= BGMV_MAX_SEG_LEN tokens, SGMV otherwise.
    """
    if plan.path == "none":
        return
    _check(y, x, lora_a, lora_b, plan)
    if plan.path == "bgmv":  # per-token rows already on the device (a CUDA graph's decode step): no plan metadata
        v = torch.zeros(plan.num_tokens, max(plan.max_rank, 1), dtype=torch.float32, device=x.device)
        bgmv_shrink(x, lora_a, plan.tok_row, plan.tok_rank, plan.max_rank, v)
        bgmv_expand(y, v, lora_b, plan.tok_row, plan.tok_rank, plan.max_rank)
        return
    meta, v, bgmv = shrink_by_plan(x, lora_a, plan)
    if bgmv:
        bgmv_expand(y, v, lora_b, meta.tok_row, meta.tok_rank, meta.max_rank)
    else:
        sgmv_expand(y, v, lora_b, meta)
