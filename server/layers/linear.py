"""Linear layers whose output slices can carry per-token LoRA deltas.

A projection may fuse several logical modules (q/k/v, gate/up) into one GEMM; each logical module
owns its adapter row pools and adds its delta into its own slice of the output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import sgmv_lora
from server.layers.context import ForwardContext


class AdapterSlot:
    """Row pools of one logical module (e.g. layer 3 `v_proj`): see `kernels.lora` for the layout."""

    __slots__ = ("name", "out_start", "out_end", "lora_a", "lora_b")

    def __init__(self, name: str, out_start: int, out_end: int):
        self.name, self.out_start, self.out_end = name, out_start, out_end
        self.lora_a: torch.Tensor | None = None  # (N_rows, d_in)
        self.lora_b: torch.Tensor | None = None  # (N_rows, d_out_slice), scale folded in


class AdaptedLinear(torch.nn.Module):
    """y = x Wᵀ + b, then for each logical module with adapters: y[:, slice] += LoRA delta."""

    def __init__(self, in_features: int, out_sizes: dict[str, int], bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features = in_features
        total = sum(out_sizes.values())
        self.weight = torch.nn.Parameter(torch.empty(total, in_features, dtype=dtype), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(total, dtype=dtype), requires_grad=False) if bias else None
        self.slots: dict[str, AdapterSlot] = {}
        start = 0
        for name, size in out_sizes.items():
            self.slots[name] = AdapterSlot(name, start, start + size)
            start += size
        self.active = [s for s in self.slots.values() if s.lora_a is not None]

    def refresh_active(self) -> None:
        """Called by the adapter manager after it (re)allocates pools."""
        self.active = [s for s in self.slots.values() if s.lora_a is not None]

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        plan = ctx.lora_plan
        if plan is not None:
            for slot in self.active:
                out = y if len(self.slots) == 1 else y[:, slot.out_start : slot.out_end]
                sgmv_lora(out, x, slot.lora_a, slot.lora_b, plan)
        return y
