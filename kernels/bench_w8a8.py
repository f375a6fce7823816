"""w8a8 (kernels.w8a8) vs int8 weight-only (kernels.quant) vs float32, per batch rows, on the CPU.

The embedded model's linear shapes (q/k/v, o, gate/up, down of SmolLM2-135M); microseconds per call
(median of --repeat timed calls after warm-up) and the speed-up over float32.

    python -m kernels.bench_w8a8 --rows 1,4,8,16,32,64,128
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kernels.quant import int8_linear, quantize_int8
from kernels.w8a8 import quantize_w8a8, w8a8_linear

SHAPES = {"qkv 576->960": (960, 576), "o 576->576": (576, 576), "gate_up 576->3072": (3072, 576), "down 1536->576": (576, 1536)}


def time_us(fn, repeat: int) -> float:
    for _ in range(5):
        fn()
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return 1e6 * statistics.median(runs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,8,16,32,64,128")
    ap.add_argument("--repeat", type=int, default=100)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'shape':>18} {'rows':>5} {'fp32 us':>9} {'int8 us':>9} {'w8a8 us':>9} {'int8 x':>7} {'w8a8 x':>7}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k) / k**0.5
        int8, w8 = quantize_int8(w), quantize_w8a8(w, torch.rand(k) * 4 + 0.1)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k)
            t_f = time_us(lambda: F.linear(x, w), args.repeat)
            t_8 = time_us(lambda: int8_linear(x, int8), args.repeat)
            t_w = time_us(lambda: w8a8_linear(x, w8), args.repeat)
            print(f"{name:>18} {rows:5d} {t_f:9.1f} {t_8:9.1f} {t_w:9.1f} {t_f / t_8:7.2f} {t_f / t_w:7.2f}")


if __name__ == "__main__":
    main()
