"""Quantize a loaded model's base weights in place (weight-only; adapters stay in the compute dtype).

  none  dense weights in the model dtype
  int8  every decoder linear int8 per output channel; embeddings + lm_head int8 per row
  int4  every decoder linear int4 in groups of `group_size` inputs; embeddings + lm_head int8 per row
        (as llama.cpp's Q4 files keep the token table at 8 bits: it is both the input lookup and the
        output projection, and 4 bits there cost the most perplexity for the fewest bytes)
  w8a8  (CPU) every decoder linear int8 after SmoothQuant smoothing, run as int8 x int8 GEMMs on
        per-token quantized activations (kernels.w8a8); embeddings + lm_head int8 per row. Needs one
        calibration pass over a short text (server/models/data/calibration.txt) before quantizing.

The quantized tensors are placed on the serving device in that device's kernel layout
(kernels.quant: int8 is one layout everywhere, int4 is torch's CPU layout on cpu and tinygemm's on
cuda and meta); `describe_kernels` says which kernel runs them there.
"""
from __future__ import annotations

import logging

import torch
from tqdm import tqdm

from kernels.quant import KERNELS, PACKED_MAX_ROWS, kernel_for, quantize_int4, quantize_int8
from kernels.w8a8 import INT_MM_FAST, ROWS_INT_MM, quantize_w8a8
from server.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

MODES = ("none", "int8", "int4", "w8a8")


def weight_bytes(model: LlamaForCausalLM) -> int:
    """Bytes held by the base model's weights (dense parameters plus quantized tensors)."""
    total = sum(p.nbytes for p in {id(p): p for p in model.parameters()}.values())
    quant = {id(q): q for q in (model.embed_quant, model.lm_head_quant) if q is not None}
    for lin in (lin for layer in model.layers for lin in layer.linears()):
        if lin.quant is not None:
            quant[id(lin.quant)] = lin.quant
    return total + sum(q.nbytes for q in quant.values())


@torch.inference_mode()
def quantize_model(model: LlamaForCausalLM, mode: str, group_size: int = 32, progress: bool = True,
                   device: torch.device | str | None = None, calibration_ids: list[int] | None = None) -> None:
    """Serve the base from `mode`'s quantized weights on `device` (default: where the weights are).

    Codes and scales are computed where the loaded weights are (the host, for a model loaded on the
    CPU), one linear at a time, and only the quantized tensors are placed on `device`, in its kernel
    layout; the dense weights are released. So a model loaded on the CPU and quantized to a GPU never
    holds its dense copy there. Everything else (norms, biases, rotary tables) stays where it is:
    `model.to(device)` moves it, and does not move the quantized tensors (plain attributes, not
    parameters), so it can run before or after this.

    w8a8 runs the dense model over `calibration_ids` first (a few hundred tokens of ordinary text) to
    learn each linear's per-channel input range (the smoothing factors).
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "none":
        return
    table_weight = model.embed_tokens.weight
    device = table_weight.device if device is None else torch.device(device)
    before = weight_bytes(model)
    linears = [lin for layer in model.layers for lin in layer.linears()]
    if mode == "w8a8":
        if device.type != "cpu":
            raise ValueError(f"quantization w8a8 runs on the CPU (torch._int_mm with per-token activations); on {device.type} use int8 or int4")
        if not calibration_ids:
            raise ValueError("quantization w8a8 needs calibration token ids (server.models.calibration)")
        ranges = input_ranges(model, calibration_ids)
    for lin in tqdm(linears, desc=f"Quantizing to {mode} on {device}", unit="linear", disable=not progress, leave=False):
        w = lin.weight.detach()
        if mode == "w8a8":
            lin.quantize(quantize_w8a8(w, ranges[lin]))
        else:
            lin.quantize(quantize_int8(w, device) if mode == "int8" else quantize_int4(w, group_size, device))
    table = quantize_int8(table_weight.detach(), device)
    model.embed_quant = table
    if model.config.tie_word_embeddings:
        model.lm_head_quant = table
    else:
        model.lm_head_quant = quantize_int8(model.lm_head_weight.detach(), device)
    model.lm_head_weight = None
    model.embed_tokens.weight = None
    log.info("quantized the base to %s%s on %s: weights %.0f MiB -> %.0f MiB", mode,
             f" (group {group_size})" if mode == "int4" else "", device, before / 2**20, weight_bytes(model) / 2**20)


def input_ranges(model: LlamaForCausalLM, ids: list[int]) -> dict:
    """Each decoder linear -> max |x_j| per input channel over one forward pass of the dense model on `ids`."""
    from server.models.perplexity import perplexity  # runs the model over a text (imports the model's layers)

    ranges: dict = {}

    def record(lin, args) -> None:
        seen = args[0].detach().abs().amax(dim=0).float()
        ranges[lin] = seen if lin not in ranges else torch.maximum(ranges[lin], seen)

    hooks = [lin.register_forward_pre_hook(record) for layer in model.layers for lin in layer.linears()]
    try:
        perplexity(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return ranges


def resolve_quantization(mode: str, device: torch.device | str) -> str:
    """`auto` -> the base quantization for this device class; an explicit mode is returned as is.

    CPU: `w8a8` (SmoothQuant int8 weights, kernels.w8a8). Measured over HTTP on two 2-core AVX2 boxes
    (docs/benchmarks.md, issue 13): it beats float32 at one stream and at 16 concurrent requests on
    both — with VNNI (int8 x int8 GEMMs from 8 rows on) by 1.3-1.9x, without VNNI (weight-only int8
    at every batch size) by 1.8x on one stream and 1.1x at 16. int4 wins one stream on both and is
    level at 16 without VNNI but loses there with it (0.76x float32 at 32 sequences). Perplexity
    +2.1 % over float32 on the embedded model (int4 is lossless there only because its weights were
    Q4_1 to begin with, not a property of int4).

    CUDA: `int8`, so one quantized base is kept on the GPU and the memory it frees goes to KV cache
    and resident adapters, which is what a multi-tenant server is short of. Why int8 weight-only
    rather than int4 (a judgement from the kernels' design: no GPU timing was measured here):
      - quality: per-channel int8 is near-lossless (+0.6 % perplexity on the embedded model,
        tests/test_quantization.py), where int4 depends on the checkpoint;
      - memory: it halves the weight bytes of a bf16 base (int4: about a quarter);
      - speed at serving batch sizes: its Triton GEMM (kernels.triton.quant) is a tiled tensor-core
        GEMM that reads each int8 tile once per row tile, so it keeps scaling with the rows a batched
        decode + chunked prefill step brings; tinygemm int4 (torch._weight_int4pack_mm) is built for
        GEMV-sized batches and gets slower than a dense GEMM as the rows grow. It also only takes
        bf16 activations, N divisible by 8, K by 32 and group sizes of 32..256.
    Without triton the int8 GEMMs dequantize each weight per call (correct, slower; /health says so).

    meta: as CUDA (the placement test builds on meta what CUDA would run). Other devices: `none`.
    """
    if mode != "auto":
        return mode
    kind = torch.device(device).type
    return "int8" if kind in ("cuda", "meta") else "w8a8" if kind == "cpu" else "none"


def _describe(fmt: str, device: torch.device, detail: str = "") -> str:
    """What the fast op of `fmt` runs on `device`, for decode- and prefill-sized batches."""
    small, large = kernel_for(fmt, device, 1), kernel_for(fmt, device, PACKED_MAX_ROWS + 1)
    text = KERNELS[small] + detail
    if large != small:
        text += f" up to {PACKED_MAX_ROWS} rows, {KERNELS[large]} above"
    if device.type == "cuda" and fmt == "int8" and small == "dequant":
        text += " (triton does not import: install the triton extra for the int8 GEMM kernel)"
    if device.type == "meta":
        text += " (meta: shapes only)"
    return text


def describe_kernels(device: torch.device | str, mode: str, group_size: int, adapter_kernels: str) -> dict[str, str]:
    """What runs the base GEMMs, the lm_head and the adapter deltas on `device` (for /health and the startup log)."""
    device = torch.device(device)
    if mode == "none":
        base, lm_head = "dense GEMM (torch)", "dense"
    elif mode == "w8a8":
        base = (f"SmoothQuant int8 weights; torch._weight_int8pack_mm below {ROWS_INT_MM} rows, per-token int8 activations "
                f"x torch._int_mm from {ROWS_INT_MM} rows (kernels.w8a8)" if INT_MM_FAST else
                "SmoothQuant int8 weights; torch._weight_int8pack_mm at every batch size (no VNNI on this CPU: "
                "torch._int_mm would be a plain loop; kernels.w8a8)")
        lm_head = f"int8 per row: {_describe('int8', device)}"
    else:
        base = _describe(mode, device, f", group {group_size}" if mode == "int4" else "")
        lm_head = f"int8 per row: {_describe('int8', device)}"
    return {"base": f"{mode}: {base}", "lm_head": lm_head, "adapters": f"{adapter_kernels} (kernels.dispatch on {device.type})"}
