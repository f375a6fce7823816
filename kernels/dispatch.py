"""Pick the kernels of a device: Triton on CUDA when triton imports, else the torch ops.

A KernelSet holds the batched adapter ops and the paged attention ops. Every op has the signature
of its torch reference (kernels.lora, kernels.s2ft, kernels.experts, kernels.attention), so callers
swap sets without other changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kernels.attention import paged_decode_attention, paged_prefill_attention
from kernels.experts import routed_experts
from kernels.lora import sgmv_lora
from kernels.s2ft import s2ft_col, s2ft_row

__all__ = ["KernelSet", "select_kernels", "triton_kernels"]


@dataclass(frozen=True)
class KernelSet:
    """sgmv_lora(y, x, lora_a, lora_b, plan), s2ft_col(y, x, col_idx, col_w, plan),
    s2ft_row(y, x, row_idx, row_w, plan), routed_experts(act, gate_up, sg, su, gate_b, up_b, down_a,
    experts, weights, num_experts), paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
    scale), paged_prefill_attention(q, k, v, k_cache, v_cache, chunks, scale);
    name: "triton", "torch-cpu" or "torch" (CUDA without triton, or the meta device)."""

    name: str
    sgmv_lora: Callable[..., None]
    s2ft_col: Callable[..., None]
    s2ft_row: Callable[..., None]
    routed_experts: Callable[..., object] = routed_experts
    paged_decode_attention: Callable[..., object] = paged_decode_attention
    paged_prefill_attention: Callable[..., object] = paged_prefill_attention
    # stage_plan(plan, staging): put what the set's ops need of a segment plan into the step's one
    # host->device copy (kernels.staging); the torch ops need nothing beyond the plan itself
    stage_plan: Callable[..., None] = lambda plan, staging: None  # noqa: E731

    def describe(self) -> dict[str, str]:
        """Which function runs each op (for /health)."""
        return {op: f"{fn.__module__}.{fn.__name__}" for op, fn in vars(self).items() if op not in ("name", "stage_plan")}


TORCH_KERNELS = KernelSet("torch-cpu", sgmv_lora, s2ft_col, s2ft_row)
TORCH_ON_DEVICE = KernelSet("torch", sgmv_lora, s2ft_col, s2ft_row)  # the same ops on CUDA without triton (or on meta)


def triton_kernels() -> KernelSet:
    """The Triton kernel set (ImportError without triton). It runs on CUDA tensors, or on CPU tensors
    under TRITON_INTERPRET=1 (the end-to-end test of the engine with these kernels)."""
    from kernels.triton.attention import paged_decode_attention_triton, paged_prefill_attention_triton
    from kernels.triton.experts import routed_experts_triton
    from kernels.triton.lora import sgmv_lora_triton, stage_plan_meta
    from kernels.triton.s2ft import s2ft_col_triton, s2ft_row_triton

    return KernelSet("triton", sgmv_lora_triton, s2ft_col_triton, s2ft_row_triton, routed_experts_triton,
                     paged_decode_attention_triton, paged_prefill_attention_triton, stage_plan_meta)


def select_kernels(device: torch.device | str, prefer: str = "auto") -> KernelSet:
    """`auto`: the Triton kernels on a CUDA device when triton imports, the torch ops otherwise;
    `triton` or `torch` force a set (`triton` raises ImportError without triton)."""
    device = torch.device(device)
    if prefer == "torch" or (prefer == "auto" and device.type != "cuda"):
        return TORCH_KERNELS if device.type == "cpu" else TORCH_ON_DEVICE
    if prefer == "triton":
        return triton_kernels()
    if prefer != "auto":
        raise ValueError(f"unknown kernel set {prefer!r}: auto, triton or torch")
    try:  # triton is an optional extra
        return triton_kernels()
    except ImportError:
        return TORCH_ON_DEVICE
