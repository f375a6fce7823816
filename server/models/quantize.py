"""Quantize a loaded model's base weights in place (weight-only; adapters stay in the compute dtype).

  none  dense weights in the model dtype
  int8  every decoder linear int8 per output channel; embeddings + lm_head int8 per row
  int4  every decoder linear int4 in groups of `group_size` inputs; embeddings + lm_head int8 per row
        (as llama.cpp's Q4 files keep the token table at 8 bits: it is both the input lookup and the
        output projection, and 4 bits there cost the most perplexity for the fewest bytes)
"""
from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from kernels.quant import PACKED_MAX_ROWS, quantize_int4, quantize_int8
from server.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

MODES = ("none", "int8", "int4")


def weight_bytes(model: LlamaForCausalLM) -> int:
    """Bytes held by the base model's weights (dense parameters plus quantized tensors)."""
    total = sum(p.nbytes for p in {id(p): p for p in model.parameters()}.values())
    quant = {id(q): q for q in (model.embed_quant, model.lm_head_quant) if q is not None}
    for lin in (lin for layer in model.layers for lin in layer.linears()):
        if lin.quant is not None:
            quant[id(lin.quant)] = lin.quant
    return total + sum(q.nbytes for q in quant.values())


@torch.inference_mode()
def quantize_model(model: LlamaForCausalLM, mode: str, group_size: int = 32, progress: bool = True) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "none":
        return
    before = weight_bytes(model)
    linears = [lin for layer in model.layers for lin in layer.linears()]
    for lin in tqdm(linears, desc=f"Quantizing to {mode}", unit="linear", disable=not progress, leave=False):
        w = lin.weight.detach()
        lin.quantize(quantize_int8(w) if mode == "int8" else quantize_int4(w, group_size))
    table = quantize_int8(model.embed_tokens.weight.detach())
    model.embed_quant = table
    if model.config.tie_word_embeddings:
        model.lm_head_quant = table
        model.lm_head_weight = None
    else:
        model.lm_head_quant = quantize_int8(model.lm_head_weight.detach())
        model.lm_head_weight = None
    model.embed_tokens.weight = None
    log.info("quantized the base to %s%s: weights %.0f MiB -> %.0f MiB", mode, f" (group {group_size})" if mode == "int4" else "",
             before / 2**20, weight_bytes(model) / 2**20)


def resolve_quantization(mode: str, device: torch.device) -> str:
    """`auto` -> the mode measured fastest for this device class (docs/benchmarks.md, quantization)."""
    if mode != "auto":
        return mode
    return "none"


def describe_kernels(device: torch.device, mode: str, group_size: int, adapter_kernels: str) -> dict[str, str]:
    """What runs the base GEMMs and the adapter deltas here (for /health and the startup log)."""
    if mode == "none":
        base = "dense GEMM (torch)"
    elif mode == "int8":
        base = f"torch._weight_int8pack_mm (bf16 activations) up to {PACKED_MAX_ROWS} rows, dequantize + GEMM above"
    else:
        base = f"torch._weight_int4pack_mm_for_cpu (group {group_size}, bf16 activations)"
    lm_head = "dense" if mode == "none" else "int8 per row (torch._weight_int8pack_mm)"
    return {"base": f"{mode}: {base}", "lm_head": lm_head, "adapters": f"{adapter_kernels} (kernels.dispatch on {device.type})"}
