"""Weight-only quantized GEMMs vs a dense float32 GEMM on this CPU, per layer shape and batch rows.

The shapes are the embedded SmolLM2-135M's (fused q/k/v, o, fused gate/up, down, lm_head); each
cell is the best of several timed rounds (robust to a noisy machine), in microseconds.

    python -m kernels.bench_quant [--rows 1,8,32,64,256]
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from kernels.quant import int4_linear, int8_linear, kernel_for, quantize_int4, quantize_int8

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def best_us(fn: Callable[[], object], iters: int = 5, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        fn()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t) / iters * 1e6)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8,32,64,256")
    ap.add_argument("--group-size", type=int, default=32)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; microseconds per call (best of 5 rounds)")
    print(f"{'shape':>8} {'N x K':>11} {'rows':>5} {'fp32':>9} {'int8':>9} {'int4':>9}  fp32/int8 fp32/int4  kernels (>1x: quantized faster)")
    g = torch.Generator().manual_seed(0)
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=g)
        w8, w4 = quantize_int8(w), quantize_int4(w, args.group_size)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k, generator=g)
            dense = best_us(lambda: x @ w.T)
            i8 = best_us(lambda: int8_linear(x, w8))
            i4 = best_us(lambda: int4_linear(x, w4))
            print(f"{name:>8} {n:>5}x{k:<5} {rows:5d} {dense:9.0f} {i8:9.0f} {i4:9.0f}  {dense / i8:9.2f}x {dense / i4:8.2f}x  "
                  f"{kernel_for('int8', x.device, rows)}, {kernel_for('int4', x.device, rows)}")


if __name__ == "__main__":
    main()
