"""Triton S²FT ops (same semantics and signatures as kernels.s2ft): gather-GEMM and GEMM-scatter.

Storage and plan as in kernels.s2ft: an adapter owns entries [o, o+k) of (idx [N] int64, w [N, width]);
padding entries have index 0 and zero weights; indices may repeat, so the scatter must accumulate.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from kernels.lora_plan import LoraPlan
from kernels.s2ft import _check
from kernels.triton.autotune import AUTOTUNE_OPTIONS, configs, rank_bucket, register_prune
from kernels.triton.lora import dot_precision, len_bucket, mma, plan_meta, shrink_by_plan

__all__ = ["s2ft_col_triton", "s2ft_row_triton"]


@triton.autotune(
    configs=configs(dict(BLOCK_M=16, BLOCK_N=64, BLOCK_E=32),
                    [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_E=be) for bm in (16, 64) for bn in (64, 128) for be in (32, 64)]),
    key=["d_out", "rank_bucket", "len_bucket"], restore_value=["y_ptr"],
    prune_configs_by=register_prune(lambda a: a["BLOCK_M"] * a["BLOCK_N"] + (a["BLOCK_M"] + a["BLOCK_N"]) * a["BLOCK_E"]),
    **AUTOTUNE_OPTIONS)
@triton.jit(do_not_specialize=["rank_bucket", "len_bucket"])
def _s2ft_col_kernel(x_ptr, idx_ptr, w_ptr, y_ptr, seg_start_ptr, seg_len_ptr, seg_row_ptr, seg_rank_ptr,
                     d_out, rank_bucket, len_bucket, sxm, sxk, swm, swn, sym, syn,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    n = tl.load(seg_len_ptr + seg)
    if pid_m * BLOCK_M >= n:
        return
    k = tl.load(seg_rank_ptr + seg)
    entry0 = tl.load(seg_row_ptr + seg).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < n, offs_n < d_out
    tok = (tl.load(seg_start_ptr + seg) + offs_m).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for e0 in range(0, k, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_mask = offs_e < k
        cols = tl.load(idx_ptr + entry0 + offs_e, mask=e_mask, other=0)
        # gather: the adapter's selected input columns of this token block, [BLOCK_M, BLOCK_E]
        xg = tl.load(x_ptr + tok[:, None] * sxm + cols[None, :] * sxk, mask=m_mask[:, None] & e_mask[None, :], other=0.0)
        wt = tl.load(w_ptr + (entry0 + offs_e)[:, None] * swm + offs_n[None, :] * swn,
                     mask=e_mask[:, None] & n_mask[None, :], other=0.0)
        acc = mma(xg, wt.to(xg.dtype), acc, PRECISION)
    ptrs = y_ptr + tok[:, None] * sym + offs_n[None, :] * syn
    mask = m_mask[:, None] & n_mask[None, :]
    yt = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, (yt.to(tl.float32) + acc).to(yt.dtype), mask=mask)


@triton.autotune(
    configs=configs(dict(BLOCK_M=16, BLOCK_E=32),
                    # no software pipelining across the barrier-ordered read-modify-write chunks
                    [dict(BLOCK_M=bm, BLOCK_E=be, num_stages=1) for bm in (16, 32, 64) for be in (32, 64)]),
    key=["rank_bucket", "len_bucket"], restore_value=["y_ptr"],
    prune_configs_by=register_prune(lambda a: 3 * a["BLOCK_M"] * a["BLOCK_E"] + a["BLOCK_E"] * a["BLOCK_E"]),
    **AUTOTUNE_OPTIONS)
@triton.jit(do_not_specialize=["rank_bucket", "len_bucket"])
def _s2ft_row_scatter_kernel(h_ptr, idx_ptr, y_ptr, seg_start_ptr, seg_len_ptr, seg_row_ptr, seg_rank_ptr,
                             rank_bucket, len_bucket, shm, sym, syn, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # One program owns the y rows of one token block of one segment, so no other program writes them.
    # Within an entry chunk, entries sharing an output row are summed first (a [E, E] "same row"
    # matrix product) and only the first of them stores; chunks run in order with a CTA barrier
    # between them, so a row repeated across chunks is read back after the earlier store.
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    n = tl.load(seg_len_ptr + seg)
    if pid_m * BLOCK_M >= n:
        return
    k = tl.load(seg_rank_ptr + seg)
    entry0 = tl.load(seg_row_ptr + seg).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n
    tok = (tl.load(seg_start_ptr + seg) + offs_m).to(tl.int64)
    for e0 in range(0, k, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_mask = offs_e < k
        out_rows = tl.load(idx_ptr + entry0 + offs_e, mask=e_mask, other=-1)
        ht = tl.load(h_ptr + tok[:, None] * shm + offs_e[None, :], mask=m_mask[:, None] & e_mask[None, :], other=0.0)
        same = (out_rows[:, None] == out_rows[None, :]) & e_mask[:, None]  # [e', e]
        merged = mma(ht, same.to(tl.float32), tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32), "ieee")
        earlier = tl.sum((same & (offs_e[:, None] < offs_e[None, :])).to(tl.int32), axis=0)
        keep = (earlier == 0) & e_mask
        tl.debug_barrier()  # the previous chunk's stores are visible to every thread of the program
        ptrs = y_ptr + tok[:, None] * sym + out_rows[None, :] * syn
        mask = m_mask[:, None] & keep[None, :]
        yt = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, (yt.to(tl.float32) + merged).to(yt.dtype), mask=mask)


def s2ft_col_triton(y: Tensor, x: Tensor, col_idx: Tensor, col_w: Tensor, plan: LoraPlan) -> None:
    """Semantics: y[s_i:s_{i+1}] += x[s_i:s_{i+1}][:, idx[o_i:o_i+k_i]] @ W[o_i:o_i+k_i]   (idx = col_idx, W = col_w)

    Same contract as kernels.s2ft.s2ft_col (col_idx trusted to lie in [0, d_in)). One program per
    (segment, token block, output block): gathers the segment's x columns chunk by chunk straight
    from x (no [T, k] copy) and multiplies with tl.dot in fp32 accumulation; y updated in place.
    """
    if plan.path == "none":
        return
    _check(y, x, col_idx, col_w, plan, "col")
    meta = plan_meta(plan, x.device)
    d_out = y.shape[1]
    grid = lambda META: (meta.num_segs, triton.cdiv(meta.max_seg_len, META["BLOCK_M"]),  # noqa: E731
                         triton.cdiv(d_out, META["BLOCK_N"]))
    _s2ft_col_kernel[grid](x, col_idx, col_w, y, meta.seg_start, meta.seg_len, meta.seg_row, meta.seg_rank,
                           d_out, rank_bucket(meta.max_rank), len_bucket(meta), x.stride(0), x.stride(1),
                           col_w.stride(0), col_w.stride(1), y.stride(0), y.stride(1),
                           PRECISION=dot_precision(x.dtype))


def s2ft_row_triton(y: Tensor, x: Tensor, row_idx: Tensor, row_w: Tensor, plan: LoraPlan) -> None:
    """Semantics: y[s_i:s_{i+1}][:, idx[o_i:o_i+k_i]] += x[s_i:s_{i+1}] @ W[o_i:o_i+k_i].T   (accumulating)

    Same contract as kernels.s2ft.s2ft_row (row_idx trusted to lie in [0, d_out)); repeated indices
    add up. GEMM: the LoRA shrink kernels with row_w as the A pool (h [T, max k] in fp32; BGMV or
    SGMV as for sgmv_lora_triton). Scatter: one program per (segment, token block) adds h into
    y[token, row_idx[entry]] without atomics (deterministic, any y dtype; see the kernel).
    """
    if plan.path == "none":
        return
    _check(y, x, row_idx, row_w, plan, "row")
    meta, h, _ = shrink_by_plan(x, row_w, plan)
    grid = lambda META: (meta.num_segs, triton.cdiv(meta.max_seg_len, META["BLOCK_M"]))  # noqa: E731
    _s2ft_row_scatter_kernel[grid](h, row_idx, y, meta.seg_start, meta.seg_len, meta.seg_row, meta.seg_rank,
                                   rank_bucket(meta.max_rank), len_bucket(meta), h.stride(0), y.stride(0), y.stride(1))
