"""Pick the batched adapter kernels for a device: Triton on CUDA when triton imports, else the torch ops.

Every op in a KernelSet has the signature of its torch reference (kernels.lora / kernels.s2ft), so
callers swap sets without other changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kernels.lora import sgmv_lora
from kernels.s2ft import s2ft_col, s2ft_row

__all__ = ["KernelSet", "select_kernels"]


@dataclass(frozen=True)
class KernelSet:
    """sgmv_lora(y, x, lora_a, lora_b, plan), s2ft_col(y, x, col_idx, col_w, plan),
    s2ft_row(y, x, row_idx, row_w, plan); name: "triton", "torch-cpu" or "torch" (CUDA without triton)."""

    name: str
    sgmv_lora: Callable[..., None]
    s2ft_col: Callable[..., None]
    s2ft_row: Callable[..., None]


TORCH_KERNELS = KernelSet("torch-cpu", sgmv_lora, s2ft_col, s2ft_row)


def select_kernels(device: torch.device | str) -> KernelSet:
    """Triton kernels for a CUDA device when triton can be imported; the torch ops otherwise."""
    device = torch.device(device)
    if device.type != "cuda":
        return TORCH_KERNELS
    try:  # triton is an optional extra
        from kernels.triton.lora import sgmv_lora_triton
        from kernels.triton.s2ft import s2ft_col_triton, s2ft_row_triton
    except ImportError:
        return KernelSet("torch", sgmv_lora, s2ft_col, s2ft_row)
    return KernelSet("triton", sgmv_lora_triton, s2ft_col_triton, s2ft_row_triton)
