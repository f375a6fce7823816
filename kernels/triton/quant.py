"""Triton weight-only int8 GEMM, same semantics and signature as kernels.quant.int8_linear_reference.

Semantics: y = x @ (q · scale[:, None])ᵀ + bias, accumulated in float32, returned in x's dtype

  x [..., K] fp32 / bf16 / fp16 (any strides), q [N, K] int8, scale [N] float32, bias [N] or None.

Each program owns a [BLOCK_M, BLOCK_N] tile of y and walks K: it loads an x tile and an int8 tile of q
(a half / quarter of the bytes of a bf16 / fp32 weight), converts q to x's dtype in registers (exact:
|q| <= 127 fits every float format here) and accumulates x·q with tl.dot in fp32. The per-output-channel
scale is applied once, in the epilogue (Σ_k x·q·s = s·Σ_k x·q), so the weight is never dequantized
in memory. bf16/fp16 activations run on tensor cores; fp32 ones with exact fp32 products ("ieee").

Decode-sized batches (M <= SPLIT_K_MAX_ROWS) have few output tiles, too few programs to stream the
weight at full bandwidth, so they also split K across programs, which add their partial (scaled)
tiles atomically into a zeroed fp32 buffer, cast to x's dtype once at the end (the summation order,
hence the last bits, can differ between runs). Larger batches store each tile once.
Autotuned per (N, K, bucketed M, dtypes); one config under TRITON_INTERPRET=1.
"""

from __future__ import annotations

from typing import Iterable

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.quant import Int8Weight
from kernels.triton.lora import INTERPRET, INTERPRET_DOT, configs, dot_precision, mma

__all__ = ["int8_linear_triton", "m_bucket", "warmup", "SPLIT_K_MAX_ROWS", "INTERPRET"]

# A guess, not swept on a GPU: at most 32 rows are two 16-row MMA tiles, where the output tiles of a
# 576..4096-wide layer give fewer programs than an H100/H200 has SMs.
SPLIT_K_MAX_ROWS = 32


def m_bucket(m: int) -> int:
    """Autotune key for the batch rows: the next power of two, at least 16 (tl.dot's smallest tile, so
    1..16 rows run the same tiles) and capped at 1024, so a new batch size rarely means a new benchmark."""
    return min(max(triton.next_power_of_2(max(m, 1)), 16), 1024)


# fp32 activations run tl.dot as FMA loops (no tensor cores) whose register tiles grow with BLOCK_K:
# ptxas (sm_90, triton 3.9) spills past BLOCK_K 16-32 at these tiles, so fp32 has its own narrow-K
# configs (BLOCK_K <= FP32_MAX_BLOCK_K) and 16-bit activations the wider ones.
FP32_MAX_BLOCK_K = 32


def prune_configs(cfgs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs of x's dtype class (above) whose row tile is no taller than the bucketed batch (taller
    tiles only add masked rows); at least the shortest of the class. Under the interpreter the first
    config only (nothing to benchmark)."""
    if INTERPRET:
        return cfgs[:1]
    fp32 = named_args["x_ptr"].dtype == torch.float32
    same = [c for c in cfgs if (c.kwargs["BLOCK_K"] <= FP32_MAX_BLOCK_K) == fp32] or cfgs
    fit = [c for c in same if c.kwargs["BLOCK_M"] <= named_args["M_BUCKET"]]
    return fit or [min(same, key=lambda c: c.kwargs["BLOCK_M"])]


@triton.jit
def int8_as(q, dtype: tl.constexpr):
    """An int8 tile in `dtype` for the MMA. Under the interpreter in float32 (which `mma` multiplies in
    there anyway): its int8 -> bf16 conversion writes the values into bf16's raw uint16 storage (triton 3.9)."""
    if INTERPRET_DOT:
        return q.to(tl.float32)
    return q.to(dtype)


@triton.jit
def _int8_gemm_kernel(x_ptr, q_ptr, scale_ptr, bias_ptr, y_ptr, M, N, K, M_BUCKET,
                      sxm, sxk, sqn, sqk, sym, syn,
                      HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Grouped order: GROUP_M row tiles sweep the column tiles together, so their q tiles stay in L2.
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    rows, cols = offs_m.to(tl.int64), offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xt = tl.load(x_ptr + rows[:, None] * sxm + offs_k[None, :] * sxk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        qt = tl.load(q_ptr + cols[None, :] * sqn + offs_k[:, None] * sqk, mask=n_mask[None, :] & k_mask[:, None], other=0)
        acc = mma(xt, int8_as(qt, xt.dtype), acc, PRECISION)  # [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]
    acc = acc * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]  # the per-channel scale, once
    if HAS_BIAS:
        if pid_k == 0:  # added by the first K split only
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    ptrs = y_ptr + rows[:, None] * sym + cols[None, :] * syn
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


def _gpu_configs(tiles: list[tuple[int, int, int, int, int]], split_k: tuple[int, ...], group_m: int) -> list[dict]:
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, SPLIT_K=sk, num_warps=nw, num_stages=ns)
            for bm, bn, bk, nw, ns in tiles for sk in split_k]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): none spills on sm_90 (tests/test_quantization_devices.py
# compiles the largest of each class and asks ptxas).
WIDE_TILES = [(32, 64, 64, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 8, 4), (128, 64, 64, 8, 4),
              (64, 128, 128, 8, 3), (128, 128, 64, 8, 3)]
WIDE_TILES_FP32 = [(32, 64, 16, 4, 3), (64, 128, 16, 8, 3)]
SPLIT_TILES = [(16, 64, 128, 4, 4), (16, 64, 256, 4, 4), (16, 128, 128, 4, 4), (16, 128, 256, 8, 4)]
SPLIT_TILES_FP32 = [(16, 64, 32, 4, 4), (16, 128, 32, 8, 3)]

# Batches above SPLIT_K_MAX_ROWS: one program per output tile, stored in x's dtype.
_int8_gemm = triton.autotune(
    configs=configs(dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, SPLIT_K=1),
                    _gpu_configs(WIDE_TILES + WIDE_TILES_FP32, (1,), group_m=8)),
    key=["N", "K", "M_BUCKET"], prune_configs_by={"early_config_prune": prune_configs})(_int8_gemm_kernel)

# Decode-sized batches: one 16-row tile, K split over programs, fp32 atomics (split 2 under the
# interpreter, so the tests exercise the atomic path).
_int8_gemm_split_k = triton.autotune(
    configs=configs(dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, SPLIT_K=2),
                    _gpu_configs(SPLIT_TILES + SPLIT_TILES_FP32, (1, 4, 8), group_m=1)),
    key=["N", "K", "M_BUCKET"], reset_to_zero=["y_ptr"],
    prune_configs_by={"early_config_prune": prune_configs})(_int8_gemm_kernel)


def int8_linear_triton(x: Tensor, w: Int8Weight, bias: Tensor | None = None) -> Tensor:
    """Semantics: y = x @ (q · scale[:, None])ᵀ + bias, accumulated in float32, returned in x's dtype

    Same signature and contract as kernels.quant.int8_linear_reference: x [..., K] fp32/bf16/fp16,
    w.q [N, K] int8 and w.scale [N] float32, bias [N] (any float dtype) or None; all on the device the
    kernel runs on (CUDA, or CPU under TRITON_INTERPRET=1). Returns [..., N] in x's dtype.
    """
    n, k = w.q.shape
    assert x.shape[-1] == k, f"x has {x.shape[-1]} input features, the weight {k}"
    assert w.q.dtype == torch.int8 and w.scale.dtype == torch.float32 and w.scale.shape == (n,)
    assert x.dtype in (torch.float32, torch.bfloat16, torch.float16), x.dtype
    assert w.q.device == x.device and w.scale.device == x.device, (x.device, w.q.device, w.scale.device)
    assert bias is None or (bias.shape == (n,) and bias.device == x.device)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    if m <= SPLIT_K_MAX_ROWS:
        y, kernel = torch.zeros(m, n, dtype=torch.float32, device=x.device), _int8_gemm_split_k
    else:
        y, kernel = torch.empty(m, n, dtype=x.dtype, device=x.device), _int8_gemm
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(n, META["BLOCK_N"]), META["SPLIT_K"])  # noqa: E731
    kernel[grid](x2, w.q, w.scale, bias, y, m, n, k, m_bucket(m),
                 x2.stride(0), x2.stride(1), w.q.stride(0), w.q.stride(1), y.stride(0), y.stride(1),
                 HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype))
    return y.to(x.dtype).view(*x.shape[:-1], n)


def warmup(weights: Iterable[Int8Weight], dtype: torch.dtype, max_rows: int) -> int:
    """Autotune the int8 GEMM at every key a server can meet, before serving; returns the launches made.

    weights: the model's Int8Weight tensors (on the GPU; shapes are deduplicated), dtype: the
    activations', max_rows: the most rows of one step. One launch per (N, K, row bucket) on zero
    activations, so the serving loop only hits the autotuners' caches (a miss benchmarks every
    config of a kernel inside a request).
    """
    by_shape = {tuple(w.q.shape): w for w in weights}
    launches = 0
    for (n, k), w in by_shape.items():
        bucket = 16
        while bucket <= m_bucket(max_rows):
            int8_linear_triton(torch.zeros(min(bucket, max_rows), k, dtype=dtype, device=w.q.device), w)
            launches += 1
            bucket *= 2
    return launches
