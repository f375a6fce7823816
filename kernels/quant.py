"""Weight-only quantized base GEMMs: int8 per output channel, int4 group-wise; on CPU, CUDA and meta.

Storage (weight W [N, K], a linear computes y = x Wᵀ):
  int8: q [N, K] int8, scale [N] float32;  W ≈ q · scale[:, None]  (symmetric; one layout on every device)
  int4: codes 0..15 and bf16 (scale, zero) per group of g inputs;  W ≈ (code - 8) · scale + zero,
        the codes packed in the layout of the kernel of the device they live on:
          cpu         [N, K/2] uint8                       torch._convert_weight_to_int4pack_for_cpu
          cuda, meta  [N/8, K/(16·t), 32, t/2] int32       torch._convert_weight_to_int4pack (tinygemm),
                      t = inner k-tiles (8, 4 or 2: the largest with 16·t | K)
The int4 form is torch's own (`_weight_int4pack_mm*`: zero is the value at code 8, the same on CPU
and CUDA) and holds llama.cpp's Q4_1 blocks exactly (code·d + m  ==  (code - 8)·d + (m + 8d)).

Each format has a readable reference (dequantize, float32 GEMM) and a fast op with the same
signature, which picks its kernel by device and batch rows (`kernel_for`, described in KERNELS):
            int8                                                 int4
  cpu       int8pack up to PACKED_MAX_ROWS rows, dequant above    int4pack
  cuda      triton-int8 (kernels.triton.quant); dequant when      tinygemm
            triton does not import
  meta      dequant (a Triton kernel cannot launch on meta)       tinygemm (torch's meta kernel: shapes only)
Adapters never see any of this: their deltas are added to the base GEMM's output in the compute dtype.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Int8Weight", "Int4Weight", "quantize_int8", "quantize_int4", "int4_codes", "inner_k_tiles",
    "int8_linear", "int8_linear_reference", "int4_linear", "int4_linear_reference", "kernel_for", "KERNELS",
    "PACKED_MAX_ROWS", "TINYGEMM_GROUP_SIZES",
]

# torch's weight-only CPU kernels are GEMV-shaped: on the 2-core AVX2 dev box int8 is 1.1-4x faster than
# a float32 GEMM at 1-8 rows and 0.7-0.9x at 32 rows, its cost growing with the rows. Dequantizing a
# weight per call costs about as much as a 32-row GEMM on it, so only prefill-sized batches (more rows
# than this) dequantize and run the dense GEMM: 0.85-0.93x at 256 rows (`python -m kernels.bench_quant`).
PACKED_MAX_ROWS = 128

# Group sizes tinygemm (torch._weight_int4pack_mm on CUDA) is compiled for.
TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)

# What each kernel name of `kernel_for` runs (for /health and the startup log).
KERNELS = {
    "int8pack": "torch._weight_int8pack_mm (bf16 activations)",
    "triton-int8": "Triton int8 GEMM (kernels.triton.quant: int8 tiles converted in registers, scale in the epilogue)",
    "dequant": "dequantize + dense GEMM",
    "int4pack": "torch._weight_int4pack_mm_for_cpu (bf16 activations)",
    "tinygemm": "torch._weight_int4pack_mm (tinygemm, bf16 activations)",
}


def _device(device: torch.device | str | None, default: torch.device) -> torch.device:
    return default if device is None else torch.device(device)


@dataclass(eq=False)
class Int8Weight:
    q: Tensor  # [N, K] int8
    scale: Tensor  # [N] float32
    # the scales in bf16 for torch's int8pack kernel; made here rather than on first use, so a
    # compiled decode step (server.engine.compiled_decode) never sees the weight change
    scale_bf16: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.scale_bf16 = self.scale.to(torch.bfloat16)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    @property
    def device(self) -> torch.device:
        return self.q.device

    def to(self, device: torch.device | str) -> "Int8Weight":
        """The same weight on `device` (one layout everywhere)."""
        return Int8Weight(self.q.to(device), self.scale.to(device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.q.to(torch.float32) * self.scale[:, None]).to(dtype)

    def rows(self, idx: Tensor, dtype: torch.dtype) -> Tensor:
        """Dequantized rows W[idx] (an embedding lookup on the same storage as the tied lm_head)."""
        return (self.q[idx].to(torch.float32) * self.scale[idx, None]).to(dtype)


def _int4_layout(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    if device.type in ("cuda", "meta"):
        return "tinygemm"
    raise ValueError(f"int4 weights are served on cpu or cuda, not {device.type}: use --quantization int8 or none")


def inner_k_tiles(k: int) -> int:
    """tinygemm's inner k-tiles for an input width: 8, 4 or 2 (the largest with 16·t dividing k)."""
    t = next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)
    if t is None:
        raise ValueError(f"int4 on CUDA (tinygemm) needs an input width divisible by 32, not {k}: use --quantization int8")
    return t


@dataclass(eq=False)
class Int4Weight:
    """int4 codes in the layout of the device they live on (module docstring); `dequantize` reads them
    back through that device's kernel on an identity matrix (CPU: float32, exact; CUDA: tinygemm's own
    bf16 weights)."""

    packed: Tensor  # cpu: [N, K // 2] uint8; cuda/meta: [N // 8, K // (16 t), 32, t // 2] int32 (tinygemm)
    scale_zero: Tensor  # [K // group, N, 2] bf16: (scale, zero) per group, the kernels' operand as is
    group_size: int

    @classmethod
    def from_codes(cls, q: Tensor, scale: Tensor, zero: Tensor, group_size: int,
                   device: torch.device | str | None = None) -> "Int4Weight":
        """q [N, K] integer codes in 0..15 with their group scales and zeros [N, K // group], packed for
        `device` (default: q's device): torch's CPU layout on cpu, tinygemm's on cuda and meta."""
        device = _device(device, q.device)
        layout = _int4_layout(device)
        n, k = q.shape
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(device=device, dtype=torch.bfloat16)
        if layout == "cpu":
            packed = torch._convert_weight_to_int4pack_for_cpu(q.to("cpu", torch.int32).contiguous(), 1)
            return cls(packed, sz, group_size)
        if n % 8 or group_size not in TINYGEMM_GROUP_SIZES:
            raise ValueError(f"int4 on {device.type} (tinygemm) needs N divisible by 8 and a group size in "
                             f"{TINYGEMM_GROUP_SIZES}, not N={n}, group {group_size}: use --quantization int8")
        tiles = inner_k_tiles(k)
        q8 = q.to(torch.uint8)
        pairs = (q8[:, 0::2] << 4) | q8[:, 1::2]  # [N, K/2]: code k even in the high nibble, as the CUDA packer reads
        packed = torch._convert_weight_to_int4pack(pairs.contiguous().to(device), tiles)
        return cls(packed, sz, group_size)

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the weight."""
        return (self.scale_zero.shape[1], self.scale_zero.shape[0] * self.group_size)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale_zero.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        k = self.shape[1]
        if self.packed.dim() == 2:  # CPU layout
            eye = torch.eye(k, dtype=torch.float32)
            wt = torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scale_zero.float())
        else:  # tinygemm layout: its kernel takes bf16 activations only
            wt = _tinygemm(torch.eye(k, dtype=torch.bfloat16, device=self.device), self)
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


def quantize_int8(w: Tensor, device: torch.device | str | None = None) -> Int8Weight:
    """Symmetric per-output-channel int8 (round to nearest, scale = max|w_row| / 127), computed where w
    is and placed on `device` (default: w's device)."""
    w = w.to(torch.float32)
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    device = _device(device, w.device)
    return Int8Weight(q.contiguous().to(device), scale.contiguous().to(device))


def quantize_int4(w: Tensor, group_size: int, device: torch.device | str | None = None) -> Int4Weight:
    """int4_codes computed where w is, packed for `device` (default: w's device)."""
    return Int4Weight.from_codes(*int4_codes(w, group_size), group_size, device=_device(device, w.device))


@functools.cache
def _triton_available() -> bool:
    from kernels.triton import available

    return available()


def kernel_for(fmt: str, device: torch.device | str, rows: int) -> str:
    """The kernel the fast op of `fmt` ("int8" | "int4") runs for `rows` activation rows on `device`,
    one of KERNELS: int8 "int8pack" (CPU, up to PACKED_MAX_ROWS rows), "triton-int8" (CUDA with triton)
    or "dequant"; int4 "int4pack" (CPU) or "tinygemm" (CUDA, meta)."""
    device = torch.device(device)
    if fmt == "int4":
        return "int4pack" if device.type == "cpu" else "tinygemm"  # the codes exist only in that kernel's layout
    if device.type == "cpu":
        return "int8pack" if rows <= PACKED_MAX_ROWS else "dequant"
    if device.type == "cuda" and _triton_available():
        return "triton-int8"
    return "dequant"


def int8_linear_reference(x: Tensor, w: Int8Weight, bias: Tensor | None = None) -> Tensor:
    """Semantics: y = x @ (q · scale[:, None])ᵀ + bias, accumulated in float32, returned in x's dtype."""
    y = x.to(torch.float32) @ w.dequantize(torch.float32).T
    return (y if bias is None else y + bias.to(torch.float32)).to(x.dtype)


def int8_linear(x: Tensor, w: Int8Weight, bias: Tensor | None = None) -> Tensor:
    """Semantics: y = x @ (q · scale[:, None])ᵀ + bias, returned in x's dtype.

    x: [T, K] on w's device. CPU: `torch._weight_int8pack_mm` with bf16 activations up to
    PACKED_MAX_ROWS rows (its float32 path is 5-10x slower). CUDA: the Triton GEMM
    (kernels.triton.quant.int8_linear_triton) when triton imports. Otherwise (CPU above
    PACKED_MAX_ROWS rows, CUDA without triton, meta) the weight is dequantized for one dense GEMM.
    """
    kernel = kernel_for("int8", x.device, x.shape[0])
    if kernel == "int8pack":
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16), w.q, w.scale_bf16).to(x.dtype)
        return y if bias is None else y.add_(bias)
    if kernel == "triton-int8":
        from kernels.triton.quant import int8_linear_triton

        return int8_linear_triton(x, w, bias)
    return F.linear(x, w.dequantize(x.dtype), bias)


def int4_linear_reference(x: Tensor, w: Int4Weight, bias: Tensor | None = None) -> Tensor:
    """Semantics: y = x @ ((q - 8) · scale + zero)ᵀ + bias (per group), float32 accumulation, x's dtype."""
    y = x.to(torch.float32) @ w.dequantize(torch.float32).T
    return (y if bias is None else y + bias.to(torch.float32)).to(x.dtype)


def _tinygemm(x: Tensor, w: Int4Weight) -> Tensor:
    """torch._weight_int4pack_mm(x, packed, group, scale_zero): x [T, K] bf16 -> [T, N] bf16.

    On meta: torch's meta kernel for the op reads FakeTensor attributes, so the plain meta tensors go
    through a FakeTensorMode and a plain meta tensor of its result's shape comes back. The operand
    shapes the CUDA kernel checks are checked here first, so a meta run fails where CUDA would.
    """
    n, k = w.shape
    torch._check(x.dim() == 2 and x.shape[1] == k and x.dtype == torch.bfloat16,
                 lambda: f"tinygemm takes x [T, {k}] bf16, not {tuple(x.shape)} {x.dtype}")
    torch._check(w.packed.shape[0] * 8 == n and w.packed.shape[1] * w.packed.shape[3] * 32 == k,
                 lambda: f"packed codes {tuple(w.packed.shape)} do not hold a [{n}, {k}] weight")
    if x.shape[0] == 0:
        return x.new_empty(0, n)
    if x.device.type == "meta":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            y = torch._weight_int4pack_mm(x, w.packed, w.group_size, w.scale_zero)
        return torch.empty(y.shape, dtype=y.dtype, device="meta")
    return torch._weight_int4pack_mm(x.contiguous(), w.packed, w.group_size, w.scale_zero)


def int4_linear(x: Tensor, w: Int4Weight, bias: Tensor | None = None) -> Tensor:
    """Semantics: y = x @ ((q - 8) · scale + zero)ᵀ + bias (per group), returned in x's dtype.

    x: [T, K] on w's device, run in bf16 (both kernels take bf16 activations and scales/zeros).
    CPU: `torch._weight_int4pack_mm_for_cpu` in slices of PACKED_MAX_ROWS rows; CUDA and meta:
    tinygemm, `torch._weight_int4pack_mm` (the codes exist only in the kernel's layout).
    """
    xb = x.to(torch.bfloat16)
    if w.packed.dim() == 2:  # CPU layout
        sz = w.scale_zero
        if x.shape[0] <= PACKED_MAX_ROWS:  # one call; a loop over a batch-sized range would fix the batch
            y = torch._weight_int4pack_mm_for_cpu(xb, w.packed, w.group_size, sz)  # size of a compiled step
        else:
            y = torch.cat([torch._weight_int4pack_mm_for_cpu(xb[i:i + PACKED_MAX_ROWS], w.packed, w.group_size, sz)
                           for i in range(0, x.shape[0], PACKED_MAX_ROWS)])
    else:
        y = _tinygemm(xb, w)
    y = y.to(x.dtype)
    return y if bias is None else y.add_(bias)
