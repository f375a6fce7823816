"""Weight-only quantized base GEMMs: int8 per output channel, int4 group-wise.

Storage (weight W [N, K], a linear computes y = x Wᵀ):
  int8: q [N, K] int8, scale [N] float32;              W ≈ q · scale[:, None]            (symmetric)
  int4: codes in 0..15 packed two per byte in torch's CPU layout, bf16 scale/zero per group;
        W ≈ (code - 8) · scale + zero  (per group of g inputs)
The int4 form is torch's own (`_weight_int4pack_mm*`: zero is the value at code 8) and holds
llama.cpp's Q4_1 blocks exactly (code·d + m  ==  (code - 8)·d + (m + 8d)).

Each format has a readable reference (dequantize, float32 GEMM) and a fast op with the same
signature; the fast op picks a kernel by device and batch size (see `kernel_for`).
Adapters never see any of this: their deltas are added to the base GEMM's output in the
compute dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Int8Weight", "Int4Weight", "quantize_int8", "quantize_int4", "int4_codes",
    "int8_linear", "int8_linear_reference", "int4_linear", "int4_linear_reference", "kernel_for",
]

# torch's weight-only CPU kernels are GEMV-shaped: on the 2-core AVX2 dev box int8 is 1.1-4x faster than
# a float32 GEMM at 1-8 rows and 0.7-0.9x at 32 rows, its cost growing with the rows. Dequantizing a
# weight per call costs about as much as a 32-row GEMM on it, so only prefill-sized batches (more rows
# than this) dequantize and run the dense GEMM: 0.85-0.93x at 256 rows (`python -m kernels.bench_quant`).
PACKED_MAX_ROWS = 128


@dataclass(eq=False)
class Int8Weight:
    q: Tensor  # [N, K] int8
    scale: Tensor  # [N] float32
    _scale_lowp: Tensor | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.q.to(torch.float32) * self.scale[:, None]).to(dtype)

    def rows(self, idx: Tensor, dtype: torch.dtype) -> Tensor:
        """Dequantized rows W[idx] (an embedding lookup on the same storage as the tied lm_head)."""
        return (self.q[idx].to(torch.float32) * self.scale[idx, None]).to(dtype)


@dataclass(eq=False)
class Int4Weight:
    """Codes live only in torch's CPU int4 layout (two per byte, K/2 bytes a row); `dequantize`
    reads them back through the kernel itself on an identity matrix (float32: exact)."""

    packed: Tensor  # [N, K // 2] uint8, torch._convert_weight_to_int4pack_for_cpu layout
    scale_zero: Tensor  # [K // group, N, 2] bf16: (scale, zero) per group, the kernel's operand as is
    group_size: int

    @classmethod
    def from_codes(cls, q: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> "Int4Weight":
        """q [N, K] integer codes in 0..15 with their group scales and zeros [N, K // group]."""
        packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return cls(packed, sz, group_size)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.shape[0], self.packed.shape[1] * 2)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale_zero.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        eye = torch.eye(self.shape[1], dtype=torch.float32)
        wt = torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scale_zero.float())
        return wt.T.contiguous().to(dtype)


def int4_codes(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric int4 per group of `group_size` input columns (min/max grid, as llama.cpp's Q4_1):
    codes [N, K] in 0..15, scale and zero [N, K // group] with W ≈ (code - 8) · scale + zero."""
    n, k = w.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"int4 group size {group_size} must divide the input width {k}")
    g = w.to(torch.float32).view(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(n, k)
    return q, scale, lo + 8 * scale


def quantize_int8(w: Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8 (round to nearest, scale = max|w_row| / 127)."""
    w = w.to(torch.float32)
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q.contiguous(), scale.contiguous())


def quantize_int4(w: Tensor, group_size: int) -> Int4Weight:
    return Int4Weight.from_codes(*int4_codes(w, group_size), group_size)


def kernel_for(fmt: str, device: torch.device, rows: int) -> str:
    """The kernel int8_linear runs: "int8pack" (torch's weight-only CPU kernel, bf16 activations) for
    decode-sized batches on CPU, else "dequant" (dequantize, GEMM in the compute dtype)."""
    if fmt == "int4":
        return "int4pack"  # the codes exist only in the CPU kernel's layout
    return "int8pack" if device.type == "cpu" and rows <= PACKED_MAX_ROWS else "dequant"


def int8_linear_reference(x: Tensor, w: Int8Weight, bias: Tensor | None = None) -> Tensor:
    """Semantics: y = x @ (q · scale[:, None])ᵀ + bias, accumulated in float32, returned in x's dtype."""
    y = x.to(torch.float32) @ w.dequantize(torch.float32).T
    return (y if bias is None else y + bias.to(torch.float32)).to(x.dtype)


def int8_linear(x: Tensor, w: Int8Weight, bias: Tensor | None = None) -> Tensor:
    """Semantics: y = x @ (q · scale[:, None])ᵀ + bias, returned in x's dtype.

    x: [T, K]. T <= PACKED_MAX_ROWS on CPU: `torch._weight_int8pack_mm` with bf16 activations
    (its float32 path is 5-10x slower); otherwise the weight is dequantized for one GEMM.
    """
    if kernel_for("int8", x.device, x.shape[0]) == "int8pack":
        if w._scale_lowp is None:
            w._scale_lowp = w.scale.to(torch.bfloat16)
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16), w.q, w._scale_lowp).to(x.dtype)
        return y if bias is None else y.add_(bias)
    return F.linear(x, w.dequantize(x.dtype), bias)


def int4_linear_reference(x: Tensor, w: Int4Weight, bias: Tensor | None = None) -> Tensor:
    """Semantics: y = x @ ((q - 8) · scale + zero)ᵀ + bias (per group), float32 accumulation, x's dtype."""
    y = x.to(torch.float32) @ w.dequantize(torch.float32).T
    return (y if bias is None else y + bias.to(torch.float32)).to(x.dtype)


def int4_linear(x: Tensor, w: Int4Weight, bias: Tensor | None = None) -> Tensor:
    """Semantics: y = x @ ((q - 8) · scale + zero)ᵀ + bias (per group), returned in x's dtype.

    x: [T, K]. `torch._weight_int4pack_mm_for_cpu` with bf16 activations and bf16 scales/zeros,
    in slices of PACKED_MAX_ROWS rows (the codes exist only in its layout).
    """
    sz, xb = w.scale_zero, x.to(torch.bfloat16)
    parts = [torch._weight_int4pack_mm_for_cpu(xb[i:i + PACKED_MAX_ROWS], w.packed, w.group_size, sz)
             for i in range(0, max(x.shape[0], 1), PACKED_MAX_ROWS)]
    y = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(x.dtype)
    return y if bias is None else y.add_(bias)
