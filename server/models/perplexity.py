"""Perplexity of a loaded model on a token stream: the quality check for base quantization.

The stream is cut into consecutive windows of `window` tokens, each scored on its own (a fresh
context: token i is predicted from tokens 0..i-1 of its window), so the figure depends only on the
model and the text, not on batch composition. Runs through the serving model's own forward
(paged attention, quantized GEMMs), on a private KV cache.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from server.layers.context import prefill_context
from server.models.llama import LlamaForCausalLM

BLOCK = 16


@torch.inference_mode()
def perplexity(model: LlamaForCausalLM, token_ids: list[int], window: int = 256) -> float:
    if len(token_ids) < 2:
        raise ValueError("need at least two tokens")
    cfg = model.config
    blocks = -(-window // BLOCK)
    saved = [(layer.attn.k_cache, layer.attn.v_cache) for layer in model.layers]
    shape = (blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim)
    device = model.norm.weight.device
    for layer in model.layers:
        layer.attn.k_cache = torch.zeros(shape, dtype=model.dtype, device=device)
        layer.attn.v_cache = torch.zeros(shape, dtype=model.dtype, device=device)
    nll, count = 0.0, 0
    try:
        for start in range(0, len(token_ids) - 1, window):
            ids = torch.tensor(token_ids[start:start + window], dtype=torch.long, device=device)
            n = ids.numel()
            if n < 2:
                break
            positions = torch.arange(n, device=device)
            logits = model.compute_logits(model(ids, positions, prefill_context(positions, list(range(blocks)))))
            nll += F.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
            count += n - 1
    finally:
        for layer, (k, v) in zip(model.layers, saved):
            layer.attn.k_cache, layer.attn.v_cache = k, v
    return math.exp(nll / count)
