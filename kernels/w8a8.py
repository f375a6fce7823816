"""int8 weights × int8 activations on the CPU, with SmoothQuant smoothing (mode `w8a8`).

Weight-only int8 (kernels.quant) reads half the bytes of float32 but computes in bf16/fp32: torch's
GEMV-shaped kernel wins at 1-8 rows and loses from ~16 rows on (a decode batch of 32 sequences is
slower than float32). An int8×int8 GEMM (`torch._int_mm`, int32 accumulation) wins from ~8 rows on,
2-5x over float32 on this 2-core AVX2 box (`python -m kernels.bench_w8a8`), once the activations are
quantized too. Per-token dynamic quantization of activations loses accuracy on the few input
channels with outliers; SmoothQuant (Xiao et al., 2023) moves part of their range into the weights:

    y = x Wᵀ = (x ⊙ s⁻¹) (W · diag(s))ᵀ,   s_j = max|x_j|^α / max|W_:,j|^(1-α)

with max|x_j| per input channel from a calibration pass (server.models.quantize), α = 0.5. The
smoothed weight is quantized per output channel (q, scale); at run time each token's smoothed
activation row is quantized with its own scale (per token, never per batch: another request's
outlier never changes my scale). Which kernel runs does depend on the step's row count (below or from
ROWS_INT_MM): the two differ by how the activations are rounded, to 8 bits or to bf16, so a greedy
request's tokens can differ between a small and a large batch, as with int8's switch at
PACKED_MAX_ROWS (kernels.quant).

Semantics (reference): x' = x ⊙ inv_s;  t_i = max|x'_i| / 127;  y_i = round(x'_i / t_i) · t_i @ (q · scale)ᵀ + b
The fast op computes exactly that from ROWS_INT_MM rows on; below, the weight-only kernel on x'
(activations in bf16 rather than rounded to 8 bits: the same weights, a little more precise).

`torch._int_mm` is oneDNN's int8 GEMM only on CPUs with VNNI (AVX-VNNI or AVX512-VNNI); elsewhere it
is a plain loop, 15-30x slower than float32 (measured on an AVX2-only AMD EPYC, `python -m
kernels.bench_w8a8`). Without VNNI the op stays weight-only at every row count (int8pack up to
kernels.quant's PACKED_MAX_ROWS rows, one float32 GEMM on the dequantized weight above): w8a8 then
serves as int8 does, with the smoothed weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.quant import PACKED_MAX_ROWS

__all__ = ["W8A8Weight", "quantize_w8a8", "w8a8_linear", "w8a8_linear_reference", "ROWS_INT_MM", "INT_MM_FAST", "SMOOTH_ALPHA"]

# `torch._int_mm` plus the per-token quantization costs ~45 us fixed; the weight-only kernel wins below
# this many rows, _int_mm from here on (python -m kernels.bench_w8a8).
ROWS_INT_MM = 8


def _cpu_has_vnni() -> bool:
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx_vnni") or caps.get("avx512_vnni"))


INT_MM_FAST = _cpu_has_vnni()  # whether torch._int_mm is a real int8 GEMM on this CPU (see above)
SMOOTH_ALPHA = 0.5  # perplexity of the embedded model: 55.06 at 0.5 vs 54.77 dense (0.6: 54.62, 0.4: 55.99)


@dataclass(eq=False)
class W8A8Weight:
    q: Tensor  # [N, K] int8: the smoothed weight W · diag(s), per output channel
    scale: Tensor  # [N] float32
    inv_s: Tensor  # [K] float32: 1 / s, applied to the activations
    # the scales in bf16 for torch's int8pack kernel; made here rather than on first use, so a
    # compiled decode step (server.engine.compiled_decode) never sees the weight change
    scale_bf16: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.scale_bf16 = self.scale.to(torch.bfloat16)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes + self.inv_s.nbytes

    @property
    def device(self) -> torch.device:
        return self.q.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W ≈ (q · scale) ⊙ inv_s per column: the unsmoothed weight (what DoRA's norms read)."""
        return (self.q.to(torch.float32) * self.scale[:, None] * self.inv_s[None, :]).to(dtype)


def quantize_w8a8(w: Tensor, act_amax: Tensor, alpha: float = SMOOTH_ALPHA) -> W8A8Weight:
    """w [N, K]; act_amax [K]: max |x_j| of the layer's inputs over a calibration pass."""
    w = w.to(torch.float32)
    s = (act_amax.to(torch.float32).clamp(min=1e-5).pow(alpha) / w.abs().amax(dim=0).clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
    smoothed = w * s
    scale = (smoothed.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(smoothed / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return W8A8Weight(q.contiguous(), scale.contiguous(), (1 / s).contiguous())


def _quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token symmetric int8: (codes [M, K] int8, scales [M, 1] float32)."""
    t = (x.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
    return torch.round(x / t).clamp(-127, 127).to(torch.int8), t


def w8a8_linear_reference(x: Tensor, w: W8A8Weight, bias: Tensor | None = None) -> Tensor:
    """Readable float32 form of the module docstring's semantics, returned in x's dtype."""
    xs = x.to(torch.float32) * w.inv_s
    codes, t = _quantize_rows(xs)
    y = (codes.to(torch.float32) * t) @ (w.q.to(torch.float32) * w.scale[:, None]).T
    return (y if bias is None else y + bias.to(torch.float32)).to(x.dtype)


def w8a8_linear(x: Tensor, w: W8A8Weight, bias: Tensor | None = None) -> Tensor:
    """y = x Wᵀ + b from the smoothed int8 weight (semantics: w8a8_linear_reference). x: [M, K]."""
    xs = x.to(torch.float32) * w.inv_s
    rows = x.shape[0]
    if rows >= ROWS_INT_MM and INT_MM_FAST:
        codes, t = _quantize_rows(xs)
        y = (torch._int_mm(codes, w.q.T).to(torch.float32).mul_(t).mul_(w.scale)).to(x.dtype)
    elif rows <= PACKED_MAX_ROWS:
        y = torch._weight_int8pack_mm(xs.to(torch.bfloat16), w.q, w.scale_bf16).to(x.dtype)
    else:  # no VNNI, a prefill-sized block: one float32 GEMM beats int8pack's bf16 path
        y = F.linear(xs, w.q.to(torch.float32) * w.scale[:, None]).to(x.dtype)
    return y if bias is None else y.add_(bias)
