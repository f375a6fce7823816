"""Attention over a paged KV cache.

The cache of one layer is `(num_blocks, block_size, Hkv, hd)` for keys and for values. A sequence
owns a list of blocks (its block table); token slot = block * block_size + offset. The step's new
keys and values are written to their slots first; decode tokens then attend over their sequences'
blocks, prefill chunks (fresh prompts and chunked-prefill continuations) over theirs, through the
device's kernels (kernels.dispatch: the Triton paged kernels on CUDA, torch's SDPA elsewhere).
"""
from __future__ import annotations

import torch

from kernels.dispatch import TORCH_KERNELS, KernelSet
from server.layers.context import ForwardContext


class PagedAttention(torch.nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.k_cache: torch.Tensor | None = None  # set by the model runner
        self.v_cache: torch.Tensor | None = None
        self.kernels: KernelSet = TORCH_KERNELS  # the engine sets the device's (kernels.dispatch)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """q: (T, H, hd); k, v: (T, Hkv, hd) -> (T, H * hd)."""
        k_flat = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        v_flat = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        k_flat.index_copy_(0, ctx.slot_mapping, k)
        v_flat.index_copy_(0, ctx.slot_mapping, v)

        n_dec = ctx.num_decode
        if ctx.prefill is None:  # a decode-only step: no copy into a shared output
            out = self.kernels.paged_decode_attention(q, self.k_cache, self.v_cache, ctx.decode_block_tables, ctx.decode_seq_lens, self.scale)
            return out.view(q.shape[0], -1)
        out = torch.empty_like(q)
        if n_dec:
            out[:n_dec] = self.kernels.paged_decode_attention(q[:n_dec], self.k_cache, self.v_cache, ctx.decode_block_tables,
                                                              ctx.decode_seq_lens, self.scale)  # fmt: skip
        out[n_dec:] = self.kernels.paged_prefill_attention(q[n_dec:], k[n_dec:], v[n_dec:], self.k_cache, self.v_cache, ctx.prefill, self.scale)
        return out.view(q.shape[0], -1)
