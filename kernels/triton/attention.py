"""Triton paged attention (flash-attention style online softmax), same semantics and signatures as kernels.attention.

Cache k_cache, v_cache (num_blocks, block_size, Hkv, hd); position p of a sequence lives at block
table[p // block_size], offset p % block_size. Keys/values are always read from the cache through the
block table, one key tile of BLOCK_N positions at a time (a tile may straddle blocks: each key row
looks up its own block, so block_size need not divide or equal BLOCK_N).

Decode: one program per (sequence, kv head); the kv head's group of H // Hkv query heads is one
query tile (padded to 16 rows for tl.dot), so each key/value tile is read once for the whole group.
Prefill (varlen, chunked prefill): one program per (chunk, BLOCK_M query rows, query head); key tiles
run from position 0 to the tile's last query position, the causal mask only on the tiles that need it.
Both keep fp32 running max / sum / accumulator (online softmax) and round once into q's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.attention import PrefillChunks, _check_decode, _check_prefill
from kernels.triton.lora import INTERPRET, dot_precision, mma

__all__ = ["paged_decode_attention_triton", "paged_prefill_attention_triton"]

LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e))


def head_block(head_dim: int) -> int:
    """Power-of-two tile covering head_dim (tl.dot needs >= 16); head_dim up to 128 (256) is one tile."""
    return max(16, triton.next_power_of_2(head_dim))


def decode_key_block(block_d: int) -> int:
    """Key tile of the decode kernel: [BLOCK_N, BLOCK_D] of K and of V stay <= 8192 elements each (32
    registers per thread at 4 warps for 16-bit data), so hd=128 gets 64 keys a tile, hd=256 32. The
    interpreter takes 16 so that short test sequences still span several tiles."""
    if INTERPRET:
        return 16
    return max(16, min(64, 8192 // block_d))


def prefill_configs() -> list[triton.Config]:
    """The prefill kernel's candidates on a GPU; under TRITON_INTERPRET=1 one small config (nothing is
    benchmarked, and short test chunks still span several query and key tiles)."""
    if INTERPRET:
        return [triton.Config(dict(BLOCK_M=16, BLOCK_N=16), num_warps=1)]
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=nw, num_stages=ns)
            for bm, bn, nw in ((32, 32, 4), (64, 32, 4), (64, 64, 4), (128, 32, 8), (128, 64, 8)) for ns in (2, 3)]


def prune_query_tile(cfgs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Prefill configs whose fp32 accumulator [BLOCK_M, BLOCK_D] and score tile [BLOCK_M, BLOCK_N] stay
    <= 64 registers per thread each; at least the smallest."""
    if INTERPRET:
        return cfgs[:1]
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    fit = [c for c in cfgs
           if c.kwargs["BLOCK_M"] * max(block_d, c.kwargs["BLOCK_N"]) <= 64 * 32 * c.num_warps]
    return fit or [min(cfgs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def q_len_bucket(max_q_len: int) -> int:
    """Autotune key for the longest chunk: a power of two (capped), so each new length does not re-benchmark."""
    return min(triton.next_power_of_2(max(max_q_len, 1)), 1024)


# --------------------------------------------------------------------------------------------------
# Shared inner loop: one query tile over key positions [k_lo, k_hi) of one sequence.
# --------------------------------------------------------------------------------------------------


@triton.jit
def _attend_tiles(q, acc, m_i, l_i, q_pos, k_lo, k_hi, table_ptr, stride_table,
                  k_ptr, v_ptr, skb, sks, skd, svb, svs, svd, offs_d, d_mask, qk_scale,
                  PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of q [BLOCK_M, BLOCK_D] over keys k_lo <= p < k_hi (k_lo a multiple of BLOCK_N).
    k_ptr / v_ptr point at the kv head's column of the caches. MASKED: apply p < k_hi and the causal
    mask p <= q_pos (otherwise the caller guarantees every key of every tile is visible to every row)."""
    for start in range(k_lo, k_hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        if MASKED:
            k_valid = k_pos < k_hi
            blk = tl.load(table_ptr + (k_pos // PAGE) * stride_table, mask=k_valid, other=0)
            kv_mask = k_valid[:, None] & d_mask[None, :]
        else:
            blk = tl.load(table_ptr + (k_pos // PAGE) * stride_table)
            kv_mask = d_mask[None, :]
        off = (k_pos % PAGE).to(tl.int64)
        blk = blk.to(tl.int64)
        kt = tl.load(k_ptr + blk[:, None] * skb + off[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        vt = tl.load(v_ptr + blk[:, None] * svb + off[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(kt), tl.zeros((q.shape[0], BLOCK_N), dtype=tl.float32), PRECISION) * qk_scale
        if MASKED:
            s = tl.where((k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :], s, float("-inf"))
        # every row has seen key 0 by now (the first tile always starts at 0), so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = mma(p.to(vt.dtype), vt, acc * alpha[:, None], PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# --------------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------------


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, o_ptr, table_ptr, seq_lens_ptr, qk_scale, head_dim,
                         sqb, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sob, soh, sod, stb, stw,
                         GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                         PAGE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + b)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask, d_mask = offs_g < GROUP, offs_d < head_dim
    heads = kvh * GROUP + offs_g  # the query heads reading kv head kvh
    q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + offs_d[None, :] * sqd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    # all rows of the group sit at the last position: a key is visible iff p <= seq_len - 1
    q_pos = tl.zeros((BLOCK_G,), dtype=tl.int64) + (seq_len - 1)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    table = table_ptr + b * stb
    full = (seq_len // BLOCK_N) * BLOCK_N  # whole tiles need no mask
    acc, m_i, l_i = _attend_tiles(q, acc, m_i, l_i, q_pos, 0, full, table, stw, k_ptr + kvh * skh, v_ptr + kvh * svh,
                                  skb, sks, skd, svb, svs, svd, offs_d, d_mask, qk_scale,
                                  PAGE, BLOCK_N, False, PRECISION)
    acc, m_i, l_i = _attend_tiles(q, acc, m_i, l_i, q_pos, full, seq_len, table, stw, k_ptr + kvh * skh,
                                  v_ptr + kvh * svh, skb, sks, skd, svb, svs, svd, offs_d, d_mask, qk_scale,
                                  PAGE, BLOCK_N, True, PRECISION)
    o = acc / l_i[:, None]
    tl.store(o_ptr + b * sob + heads[:, None] * soh + offs_d[None, :] * sod, o.to(o_ptr.dtype.element_ty),
             mask=g_mask[:, None] & d_mask[None, :])


def paged_decode_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                                  scale: float) -> Tensor:
    """Semantics: o[b, h] = softmax(scale * q[b, h] @ K_b[:, g].T) @ V_b[:, g],  g = h // (H // Hkv),
    K_b[p] = k_cache[block_tables[b, p // bs], p % bs] for p < seq_lens[b] (V_b likewise)

    Same contract as kernels.attention.paged_decode_attention: q (B, H, hd) any strides; caches
    (num_blocks, bs, Hkv, hd) any strides; block_tables (B, W) int64/int32; seq_lens (B,) int on q's
    device, each >= 1 and <= W * bs. Returns (B, H, hd) contiguous in q's dtype (fp32, bf16, fp16).
    Grid (B, Hkv); no host sync (the loop bounds are read from seq_lens on the device).
    """
    _check_decode(q, k_cache, v_cache, block_tables, seq_lens)
    B, H, hd = q.shape
    _, page, Hkv, _ = k_cache.shape
    out = torch.empty(B, H, hd, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    group = H // Hkv
    block_d = head_block(hd)
    _paged_decode_kernel[(B, Hkv)](
        q, k_cache, v_cache, out, block_tables, seq_lens, scale * LOG2E, hd,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *block_tables.stride(),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, PAGE=page,
        BLOCK_N=decode_key_block(block_d), PRECISION=dot_precision(q.dtype),
        num_warps=1 if INTERPRET else 4)
    return out


# --------------------------------------------------------------------------------------------------
# Prefill (varlen)
# --------------------------------------------------------------------------------------------------


@triton.autotune(configs=prefill_configs(), key=["head_dim", "group", "q_len_bucket"],
                 prune_configs_by={"early_config_prune": prune_query_tile})
@triton.jit
def _paged_prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, table_ptr, cu_q_ptr, ctx_ptr, qk_scale, head_dim, group,
                          q_len_bucket, sqt, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sot, soh, sod, stn, stw,
                          BLOCK_D: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    start = tl.load(cu_q_ptr + chunk)
    n = tl.load(cu_q_ptr + chunk + 1) - start
    if pid_m * BLOCK_M >= n:
        return  # the grid covers the longest chunk
    ctx = tl.load(ctx_ptr + chunk)
    kvh = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask, d_mask = offs_m < n, offs_d < head_dim
    rows = start + offs_m
    q = tl.load(q_ptr + rows[:, None] * sqt + h * sqh + offs_d[None, :] * sqd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = ctx + offs_m  # rows past the chunk end compute garbage-free values that are not stored
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    table = table_ptr + chunk * stn
    # keys below the tile's first query position are visible to every row: whole tiles there need no mask
    hi = tl.minimum(ctx + (pid_m + 1) * BLOCK_M, ctx + n)  # one past the tile's last query position
    lo = ((ctx + pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
    k_p, v_p = k_ptr + kvh * skh, v_ptr + kvh * svh
    acc, m_i, l_i = _attend_tiles(q, acc, m_i, l_i, q_pos, 0, lo, table, stw, k_p, v_p,
                                  skb, sks, skd, svb, svs, svd, offs_d, d_mask, qk_scale,
                                  PAGE, BLOCK_N, False, PRECISION)
    acc, m_i, l_i = _attend_tiles(q, acc, m_i, l_i, q_pos, lo, hi, table, stw, k_p, v_p,
                                  skb, sks, skd, svb, svs, svd, offs_d, d_mask, qk_scale,
                                  PAGE, BLOCK_N, True, PRECISION)
    o = acc / l_i[:, None]
    tl.store(o_ptr + rows[:, None] * sot + h * soh + offs_d[None, :] * sod, o.to(o_ptr.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])


def paged_prefill_attention_triton(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                                   chunks: PrefillChunks, scale: float) -> Tensor:
    """Semantics: o[t, h] = softmax(scale * q[t, h] @ K_i[0:p_t + 1, g].T) @ V_i[0:p_t + 1, g]  for row t of chunk i,
    p_t = context_lens[i] + t - starts[i], g = h // (H // Hkv), K_i[p] = k_cache[block_tables[i, p // bs], p % bs]

    Same contract as kernels.attention.paged_prefill_attention: q (T_p, H, hd); k, v (T_p, Hkv, hd) are
    checked but not read (the chunk's own keys are already in the cache, which is read for every
    chunk, with or without context); caches (num_blocks, bs, Hkv, hd); chunks' device tensors
    cu_q_lens, context_lens_t, block_tables. Returns (T_p, H, hd) contiguous in q's dtype (rows outside
    every chunk uninitialised). Grid (N, cdiv(max_q_len, BLOCK_M), H); no host sync.
    """
    _check_prefill(q, k, v, k_cache, v_cache, chunks)
    T, H, hd = q.shape
    _, page, Hkv, _ = k_cache.shape
    out = torch.empty(T, H, hd, dtype=q.dtype, device=q.device)
    N = len(chunks.starts)
    if N == 0 or chunks.max_q_len == 0:
        return out
    tables = chunks.block_tables
    grid = lambda META: (N, triton.cdiv(chunks.max_q_len, META["BLOCK_M"]), H)  # noqa: E731
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, out, tables, chunks.cu_q_lens, chunks.context_lens_t, scale * LOG2E, hd, H // Hkv,
        q_len_bucket(chunks.max_q_len), *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        *tables.stride(), BLOCK_D=head_block(hd), PAGE=page, PRECISION=dot_precision(q.dtype))
    return out
