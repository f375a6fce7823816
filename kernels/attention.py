"""Attention over a paged KV cache: the torch ops (CPU, and CUDA without triton) and their references.

Cache of one layer: k_cache, v_cache (num_blocks, block_size, Hkv, hd). A sequence owns a list of
blocks (its block table); the key of its position p sits at k_cache[table[p // block_size], p % block_size].
GQA: H query heads over Hkv kv heads (H % Hkv == 0); query head h reads kv head h // (H // Hkv).

The Triton ops with the same signatures live in kernels.triton.attention. The torch ops never sync
with the host (no .item()/.tolist()), and every tensor they create lives on q's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PrefillChunks", "paged_decode_attention", "paged_decode_attention_reference",
           "paged_prefill_attention", "paged_prefill_attention_reference"]


@dataclass(slots=True)
class PrefillChunks:
    """The prefill chunks of one step, over the prefill rows q[0:T_p] of the step (rows relative to the first prefill token)."""

    starts: list[int]  # host ints: first row of each chunk
    ends: list[int]  # host ints: end row of each chunk
    # host ints: tokens already in the cache before each chunk (its queries sit at positions
    # context_len .. context_len + n - 1)
    context_lens: list[int]
    cu_q_lens: Tensor  # [N + 1] int64 on the device: starts + [ends[-1]] (same numbers)
    context_lens_t: Tensor  # [N] int64 on the device
    # [N, W] int64 on the device; row i covers context_lens[i] + n_i tokens; padding entries are any valid block index
    block_tables: Tensor
    max_q_len: int  # host int

    @classmethod
    def build(cls, starts: list[int], ends: list[int], context_lens: list[int], block_tables: list[list[int]],
              device: torch.device | str, pad_block: int = 0) -> "PrefillChunks":
        """From host lists (chunks back to back: ends[i] == starts[i + 1]); tables are padded with
        `pad_block` to the longest. One host->device copy."""
        n = len(starts)
        if not (len(ends) == len(context_lens) == len(block_tables) == n):
            raise ValueError("starts, ends, context_lens and block_tables must have one entry per chunk")
        if any(ends[i] != starts[i + 1] for i in range(n - 1)):
            raise ValueError(f"chunks must be back to back (ends[i] == starts[i + 1]): starts={starts} ends={ends}")
        width = max((len(t) for t in block_tables), default=0) or 1
        flat = list(starts) + ([ends[-1]] if n else [0]) + list(context_lens)
        for t in block_tables:
            flat += list(t) + [pad_block] * (width - len(t))
        packed = torch.tensor(flat, dtype=torch.int64).to(device)
        return cls(starts=list(starts), ends=list(ends), context_lens=list(context_lens),
                   cu_q_lens=packed[:n + 1], context_lens_t=packed[n + 1:2 * n + 1],
                   block_tables=packed[2 * n + 1:].view(n, width),
                   max_q_len=max((e - s for s, e in zip(starts, ends)), default=0))


def _check_cache(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must both be "
                         "(num_blocks, block_size, Hkv, hd)")
    H, hd = q.shape[-2:]
    Hkv = k_cache.shape[2]
    if k_cache.shape[3] != hd or H % Hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}: need the same head_dim "
                         "and a number of query heads divisible by the kv heads")


def _check_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be (B, H, hd), got {tuple(q.shape)}")
    _check_cache(q, k_cache, v_cache)
    B = q.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != B or seq_lens.shape != (B,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} must be (B, W) and seq_lens {tuple(seq_lens.shape)} "
                         f"(B,) with B={B}")


def _check_prefill(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, chunks: PrefillChunks) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0]:
        raise ValueError(f"q {tuple(q.shape)} must be (T_p, H, hd) and k/v {tuple(k.shape)}/{tuple(v.shape)} (T_p, Hkv, hd)")
    _check_cache(q, k_cache, v_cache)
    n = len(chunks.starts)
    if chunks.block_tables.dim() != 2 or chunks.block_tables.shape[0] != n or chunks.cu_q_lens.shape != (n + 1,):
        raise ValueError(f"chunks: {n} chunks but block_tables {tuple(chunks.block_tables.shape)} "
                         f"and cu_q_lens {tuple(chunks.cu_q_lens.shape)}")
    if n and chunks.ends[-1] > q.shape[0]:
        raise ValueError(f"chunks end at row {chunks.ends[-1]} but q has {q.shape[0]} rows")


# --------------------------------------------------------------------------------------------------
# Torch ops
# --------------------------------------------------------------------------------------------------


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                           scale: float) -> Tensor:
    """Semantics: o[b, h] = softmax(scale * q[b, h] @ K_b[:, g].T) @ V_b[:, g],  g = h // (H // Hkv),
    K_b[p] = k_cache[block_tables[b, p // bs], p % bs] for p < seq_lens[b] (V_b likewise)

    q: (B, H, hd); k_cache, v_cache: (num_blocks, bs, Hkv, hd) in q's dtype (fp32, bf16, fp16);
    block_tables: (B, W) int64, padding entries any valid block; seq_lens: (B,) int64 on q's device,
    >= 1 (the cache already holds every attended token, the current one included). Returns (B, H, hd)
    in q's dtype. Gathers all W blocks of every sequence and masks positions >= seq_lens on the
    device (SDPA, enable_gqa): no host sync.
    """
    _check_decode(q, k_cache, v_cache, block_tables, seq_lens)
    B, W = block_tables.shape
    _, bs, Hkv, hd = k_cache.shape
    keys = k_cache[block_tables].view(B, W * bs, Hkv, hd).transpose(1, 2)  # (B, Hkv, L, hd)
    values = v_cache[block_tables].view(B, W * bs, Hkv, hd).transpose(1, 2)
    mask = torch.arange(W * bs, device=q.device).unsqueeze(0) < seq_lens.unsqueeze(1)  # (B, L)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask.view(B, 1, 1, W * bs),
                                       scale=scale, enable_gqa=True)  # (B, H, 1, hd)
    return o.squeeze(2)


def paged_prefill_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, chunks: PrefillChunks,
                            scale: float) -> Tensor:
    """Semantics: o[t, h] = softmax(scale * q[t, h] @ K_i[0:p_t + 1, g].T) @ V_i[0:p_t + 1, g]  for row t of chunk i,
    p_t = context_lens[i] + t - starts[i], g = h // (H // Hkv), K_i[p] = k_cache[block_tables[i, p // bs], p % bs]

    q: (T_p, H, hd); k, v: (T_p, Hkv, hd), the prefill rows' own keys/values, already written into the
    cache at their slots; caches (num_blocks, bs, Hkv, hd); all in one dtype (fp32, bf16, fp16).
    Returns (T_p, H, hd) in q's dtype (rows outside every chunk are left uninitialised). Loops over
    chunks with the host ints: a chunk without context attends to its own k/v (causal SDPA, no cache
    gather), one with context gathers its blocks and masks causally on the device. No host sync.
    """
    _check_prefill(q, k, v, k_cache, v_cache, chunks)
    _, bs, Hkv, hd = k_cache.shape
    out = torch.empty_like(q)
    for i, (s, e, ctx) in enumerate(zip(chunks.starts, chunks.ends, chunks.context_lens)):
        n = e - s
        if n == 0:
            continue
        qs = q[s:e].transpose(0, 1).unsqueeze(0)  # (1, H, n, hd)
        if ctx == 0:
            # Fresh prompt: its own keys are all there is; the causal kernel needs no mask.
            keys = k[s:e].transpose(0, 1).unsqueeze(0)  # (1, Hkv, n, hd)
            values = v[s:e].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        else:
            total = ctx + n
            table = chunks.block_tables[i, :(total + bs - 1) // bs]  # host-int slice: no padding gathered
            keys = k_cache[table].view(-1, Hkv, hd)[:total].transpose(0, 1).unsqueeze(0)  # (1, Hkv, total, hd)
            values = v_cache[table].view(-1, Hkv, hd)[:total].transpose(0, 1).unsqueeze(0)
            # query j sits at position ctx + j and sees keys 0..ctx + j
            q_pos = torch.arange(ctx, total, device=q.device).unsqueeze(1)
            mask = torch.arange(total, device=q.device).unsqueeze(0) <= q_pos  # (n, total)
            o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        out[s:e] = o.squeeze(0).transpose(0, 1)  # (n, H, hd)
    return out


# --------------------------------------------------------------------------------------------------
# References: readable loops in float32, keys and values read only from the cache.
# --------------------------------------------------------------------------------------------------


def _positions(cache: Tensor, table: list[int], n: int) -> Tensor:
    """The first n positions of one sequence, (n, Hkv, hd) in float32: position p at block table[p // bs], offset p % bs."""
    bs = cache.shape[1]
    return torch.stack([cache[table[p // bs], p % bs] for p in range(n)]).float()


def _attend(qv: Tensor, keys: Tensor, values: Tensor, scale: float) -> Tensor:
    """One query (hd,) over keys/values (n, hd), all float32: softmax(scale * q . k_j) weighted sum of v_j."""
    weights = torch.softmax((keys @ qv) * scale, dim=0)  # (n,)
    return weights @ values  # (hd,)


def paged_decode_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                                     seq_lens: Tensor, scale: float) -> Tensor:
    """Semantics: as paged_decode_attention. Readable loops over sequences and heads in float32,
    rounded once to q's dtype."""
    _check_decode(q, k_cache, v_cache, block_tables, seq_lens)
    B, H, hd = q.shape
    group = H // k_cache.shape[2]
    out = torch.zeros(B, H, hd, dtype=torch.float32, device=q.device)
    for b, (table, n) in enumerate(zip(block_tables.tolist(), seq_lens.tolist())):
        keys, values = _positions(k_cache, table, n), _positions(v_cache, table, n)  # (n, Hkv, hd)
        for h in range(H):
            out[b, h] = _attend(q[b, h].float(), keys[:, h // group], values[:, h // group], scale)
    return out.to(q.dtype)


def paged_prefill_attention_reference(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                                      chunks: PrefillChunks, scale: float) -> Tensor:
    """Semantics: as paged_prefill_attention. Readable loops over chunks, query positions and heads in
    float32, keys/values read from the cache only (k and v are not used), rounded once to q's dtype;
    rows outside every chunk are zero."""
    _check_prefill(q, k, v, k_cache, v_cache, chunks)
    T, H, hd = q.shape
    group = H // k_cache.shape[2]
    out = torch.zeros(T, H, hd, dtype=torch.float32, device=q.device)
    for i, (s, e, ctx) in enumerate(zip(chunks.starts, chunks.ends, chunks.context_lens)):
        table = chunks.block_tables[i].tolist()
        keys, values = _positions(k_cache, table, ctx + e - s), _positions(v_cache, table, ctx + e - s)
        for t in range(s, e):
            p = ctx + t - s  # the query's position: it sees keys 0..p
            for h in range(H):
                out[t, h] = _attend(q[t, h].float(), keys[:p + 1, h // group], values[:p + 1, h // group], scale)
    return out.to(q.dtype)
