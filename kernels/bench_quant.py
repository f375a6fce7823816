"""Weight-only quantized GEMMs vs a dense GEMM, per layer shape and batch rows, on the CPU or a GPU.

CPU: float32 activations, dense float32 GEMM vs int8pack/int4pack (the shapes of the embedded
SmolLM2-135M: fused q/k/v, o, fused gate/up, down, lm_head). CUDA: bf16 activations, dense bf16
cuBLAS GEMM vs the Triton int8 GEMM and tinygemm int4, by default on Llama-3-8B's shapes (the first
call at each shape and row bucket autotunes; the timing rounds come after it). Each cell is the
best of several timed rounds (robust to a noisy machine), in microseconds.

    python -m kernels.bench_quant [--rows 1,8,32,64,256] [--device cpu|cuda] [--shapes smollm|llama8b]
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from kernels.quant import int4_linear, int8_linear, kernel_for, quantize_int4, quantize_int8

SHAPES = {
    "smollm": {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)},
    "llama8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336), "lm_head": (128256, 4096)},
}


def best_us(fn: Callable[[], object], device: torch.device, iters: int = 5, rounds: int = 5) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(rounds):
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t) / iters * 1e6)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8,32,64,256")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--shapes", choices=sorted(SHAPES), default=None, help="default: smollm on cpu, llama8b on cuda")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = SHAPES[args.shapes or ("llama8b" if device.type == "cuda" else "smollm")]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; {dtype} activations; microseconds per call (best of 5 rounds)")
    print(f"{'shape':>8} {'N x K':>12} {'rows':>5} {'dense':>9} {'int8':>9} {'int4':>9}  dense/int8 dense/int4  "
          "kernels (>1x: quantized faster)")
    g = torch.Generator().manual_seed(0)
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, generator=g)
        w8, w4 = quantize_int8(w, device), quantize_int4(w, args.group_size, device)
        wd = w.to(device, dtype)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k, generator=g).to(device, dtype)
            dense = best_us(lambda: x @ wd.T, device)
            i8 = best_us(lambda: int8_linear(x, w8), device)
            i4 = best_us(lambda: int4_linear(x, w4), device)
            print(f"{name:>8} {n:>6}x{k:<5} {rows:5d} {dense:9.0f} {i8:9.0f} {i4:9.0f}  {dense / i8:9.2f}x {dense / i4:8.2f}x  "
                  f"{kernel_for('int8', device, rows)}, {kernel_for('int4', device, rows)}")


if __name__ == "__main__":
    main()
