"""Linear layers whose output slices can carry per-token adapter deltas (LoRA, S²FT).

A projection may fuse several logical modules (q/k/v, gate/up) into one GEMM; each logical module
owns its adapter row pools and adds its delta into its own slice of the output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import TORCH_KERNELS, KernelSet
from kernels.quant import Int4Weight, Int8Weight, int4_linear, int8_linear
from server.layers.context import ForwardContext


class AdapterSlot:
    """The adapter pools of one logical module (e.g. layer 3 `v_proj`), by pool name:

    LoRA (`kernels.lora`): `lora_a (N, d_in)`, `lora_b (N, d_out)` — Bᵀ rows with the scale folded in.
    S²FT (`kernels.s2ft`): `s2_col_idx (M,)`, `s2_col_w (M, d_out)`, `s2_row_idx (M,)`, `s2_row_w (M, d_in)`.
    A family's pools exist once some resident adapter of that family targets the module.
    """

    __slots__ = ("name", "d_in", "d_out", "out_start", "out_end", "pools")

    def __init__(self, name: str, d_in: int, out_start: int, out_end: int):
        self.name, self.d_in, self.out_start, self.out_end = name, d_in, out_start, out_end
        self.d_out = out_end - out_start
        self.pools: dict[str, torch.Tensor] = {}


class AdaptedLinear(torch.nn.Module):
    """y = x Wᵀ + b, then for each logical module with adapters: y[:, slice] += its tokens' adapter deltas.

    W is a dense parameter, or after `quantize` a weight-only int8/int4 tensor (kernels.quant);
    adapter deltas are computed in x's dtype either way.
    """

    def __init__(self, in_features: int, out_sizes: dict[str, int], bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features = in_features
        total = sum(out_sizes.values())
        self.weight = torch.nn.Parameter(torch.empty(total, in_features, dtype=dtype), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(total, dtype=dtype), requires_grad=False) if bias else None
        self.quant: Int8Weight | Int4Weight | None = None
        self.kernels: KernelSet = TORCH_KERNELS  # the engine sets the device's (kernels.dispatch)
        self.slots: dict[str, AdapterSlot] = {}
        start = 0
        for name, size in out_sizes.items():
            self.slots[name] = AdapterSlot(name, in_features, start, start + size)
            start += size
        self.refresh_active()

    def refresh_active(self) -> None:
        """Called by the adapter manager after it (re)allocates pools."""
        self.active = [s for s in self.slots.values() if s.pools]

    def quantize(self, weight: Int8Weight | Int4Weight) -> None:
        """Serve the base GEMM from `weight` (built from self.weight) and free the dense weight."""
        self.quant = weight
        self.weight = None

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """x Wᵀ + b without adapter deltas."""
        if self.quant is None:
            return F.linear(x, self.weight, self.bias)
        if isinstance(self.quant, Int8Weight):
            return int8_linear(x, self.quant, self.bias)
        return int4_linear(x, self.quant, self.bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        y = self.base(x)
        if not ctx.lora_plans and not ctx.s2ft_plans:
            return y
        for slot in self.active:
            lora, s2ft = ctx.lora_plans.get(slot.name), ctx.s2ft_plans.get(slot.name)
            if lora is None and s2ft is None:
                continue  # no adapter in this step targets this module
            out = y if len(self.slots) == 1 else y[:, slot.out_start : slot.out_end]
            p, k = slot.pools, self.kernels
            if lora is not None and "lora_a" in p:
                k.sgmv_lora(out, x, p["lora_a"], p["lora_b"], lora)
            if s2ft is not None and "s2_col_w" in p:
                k.s2ft_col(out, x, p["s2_col_idx"], p["s2_col_w"], s2ft)
                k.s2ft_row(out, x, p["s2_row_idx"], p["s2_row_w"], s2ft)
        return y
