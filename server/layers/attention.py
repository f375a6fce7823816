"""Attention over a paged KV cache.

The cache of one layer is `(num_blocks, block_size, Hkv, hd)` for keys and for values. A sequence
owns a list of blocks (its block table); token slot = block * block_size + offset.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from server.layers.context import ForwardContext


class PagedAttention(torch.nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.k_cache: torch.Tensor | None = None  # set by the model runner
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """q: (T, H, hd); k, v: (T, Hkv, hd) -> (T, H * hd)."""
        k_flat = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        v_flat = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        k_flat.index_copy_(0, ctx.slot_mapping, k)
        v_flat.index_copy_(0, ctx.slot_mapping, v)

        out = torch.empty_like(q)
        n_dec = ctx.num_decode
        if n_dec:
            out[:n_dec] = self._decode(q[:n_dec], ctx)
        for chunk in ctx.prefills:
            out[chunk.start : chunk.end] = self._prefill(q, k, v, chunk)
        return out.view(q.shape[0], -1)

    def _decode(self, q: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        tables = ctx.decode_block_tables  # (B, nb)
        b = tables.shape[0]
        keys = self.k_cache[tables].view(b, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, L, hd)
        values = self.v_cache[tables].view(b, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=ctx.decode_mask, scale=self.scale, enable_gqa=True
        )  # (B, H, 1, hd)
        return o.squeeze(2)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk) -> torch.Tensor:
        n = chunk.end - chunk.start
        qs = q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # (1, H, n, hd)
        if chunk.context_len == 0:
            # Fresh prompt: its own keys are all there is; the causal kernel needs no mask.
            keys = k[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
            values = v[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, keys, values, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            total = chunk.context_len + n
            keys = self.k_cache[chunk.block_table].view(-1, self.num_kv_heads, self.head_dim)[:total]
            values = self.v_cache[chunk.block_table].view(-1, self.num_kv_heads, self.head_dim)[:total]
            keys, values = keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0)
            # query i sits at position context_len + i and sees keys 0..context_len + i
            q_pos = torch.arange(chunk.context_len, total).unsqueeze(1)
            mask = torch.arange(total).unsqueeze(0) <= q_pos  # (n, total)
            o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return o.squeeze(0).transpose(0, 1)  # (n, H, hd)
