"""Linear layers whose output slices can carry per-token adapter deltas (each pool space applies its own).

A projection may fuse several logical modules (q/k/v, gate/up) into one GEMM; each logical module
owns its adapter row pools and adds its delta into its own slice of the output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import TORCH_KERNELS, KernelSet
from kernels.quant import Int4Weight, Int8Weight, int4_linear, int8_linear
from kernels.w8a8 import W8A8Weight, w8a8_linear
from server.layers.context import ForwardContext


class AdapterSlot:
    """The adapter pools of one logical module (e.g. layer 3 `v_proj`), by pool name. Each pool space
    (server.families: LoRA rank-rows, S²FT entries, ...) names its own pools; they exist once some
    resident adapter of that space targets the module."""

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
        self.quant: Int8Weight | Int4Weight | W8A8Weight | None = None
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

    def quantize(self, weight: Int8Weight | Int4Weight | W8A8Weight) -> None:
        """Serve the base GEMM from `weight` (built from self.weight) and free the dense weight."""
        self.quant = weight
        self.weight = None

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """x Wᵀ + b without adapter deltas."""
        if self.quant is None:
            return F.linear(x, self.weight, self.bias)
        if isinstance(self.quant, Int8Weight):
            return int8_linear(x, self.quant, self.bias)
        if isinstance(self.quant, W8A8Weight):
            return w8a8_linear(x, self.quant, self.bias)
        return int4_linear(x, self.quant, self.bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        y = self.base(x)
        if ctx.lora_segs is not None:
            self._lora_segments(y, x, ctx.lora_segs)
            return y
        if not ctx.plans:
            return y
        for slot in self.active:
            out = None
            for space, plans in ctx.plans.items():
                plan = plans.get(slot.name)
                if plan is None or not space.has_pools(slot.pools):
                    continue  # no adapter of this space in the step targets this module
                if out is None:
                    out = y if len(self.slots) == 1 else y[:, slot.out_start : slot.out_end]
                space.apply(out, x, slot, plan, self)
        return y

    def _lora_segments(self, y: torch.Tensor, x: torch.Tensor, segs: dict[str, torch.Tensor]) -> None:
        """The compiled CPU decode step's LoRA deltas (server.engine.compiled_decode): each logical module's
        segments in one call of the C++ op, which torch.compile keeps as an opaque in-place call."""
        for slot in self.slots.values():
            a = slot.pools.get("lora_a")
            if a is not None:
                out = y if len(self.slots) == 1 else y[:, slot.out_start : slot.out_end]
                torch.ops.hotswap.lora_segments(out, x, a, slot.pools["lora_b"], segs[slot.name])
