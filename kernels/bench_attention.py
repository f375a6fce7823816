"""GPU microbenchmark of paged attention: the Triton ops vs the torch ops (SDPA over gathered blocks).

    python -m kernels.bench_attention [--dtype bf16] [--heads 32 8 128] [--block-size 16]
    python -m kernels.bench_attention --interpret   # no GPU: tiny CPU smoke run under TRITON_INTERPRET=1

Decode cases: B sequences of L cached tokens; prefill cases: N chunks of n query rows after c context
tokens. Prints microseconds per call (median of triton.testing.do_bench) and the largest
|Triton - torch|. Run it as a module: `python kernels/bench_attention.py` would make kernels/triton
shadow the triton package.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from kernels.bench import time_us
from kernels.triton import bench_device

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_cache(lengths: list[int], bs: int, Hkv: int, hd: int, dtype: torch.dtype, device: torch.device):
    """Caches with shuffled blocks; block 0 is the padding (null) block. Returns caches and tables."""
    need = [math.ceil(n / bs) for n in lengths]
    num_blocks = 1 + sum(need)
    k_cache = torch.randn(num_blocks, bs, Hkv, hd, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    order = (torch.randperm(num_blocks - 1) + 1).tolist()
    tables, used = [], 0
    for k in need:
        tables.append(order[used:used + k])
        used += k
    width = max(need)
    return k_cache, v_cache, [t + [0] * (width - len(t)) for t in tables]


def bench_decode(B: int, L: int, args, device: torch.device, dtype: torch.dtype) -> list[str]:
    from kernels.attention import paged_decode_attention
    from kernels.triton.attention import paged_decode_attention_triton

    H, Hkv, hd = args.heads
    k_cache, v_cache, tables = make_cache([L] * B, args.block_size, Hkv, hd, dtype, device)
    q = torch.randn(B, H, hd, dtype=dtype, device=device)
    tables_t = torch.tensor(tables, dtype=torch.int64, device=device)
    lens = torch.full((B,), L, dtype=torch.int64, device=device)
    call = (q, k_cache, v_cache, tables_t, lens, hd**-0.5)
    err = (paged_decode_attention_triton(*call).float() - paged_decode_attention(*call).float()).abs().max()
    return [f"decode B={B} L={L}", f"{time_us(lambda: paged_decode_attention(*call), device):.1f}",
            f"{time_us(lambda: paged_decode_attention_triton(*call), device):.1f}", f"{float(err):.2e}"]


def bench_prefill(N: int, n: int, c: int, args, device: torch.device, dtype: torch.dtype) -> list[str]:
    from kernels.attention import PrefillChunks, paged_prefill_attention
    from kernels.triton.attention import paged_prefill_attention_triton

    H, Hkv, hd = args.heads
    k_cache, v_cache, tables = make_cache([c + n] * N, args.block_size, Hkv, hd, dtype, device)
    q = torch.randn(N * n, H, hd, dtype=dtype, device=device)
    k = torch.randn(N * n, Hkv, hd, dtype=dtype, device=device)
    v = torch.randn_like(k)
    bs = args.block_size
    slots = torch.tensor([t[p // bs] * bs + p % bs for t in tables for p in range(c, c + n)], device=device)
    k_cache.view(-1, Hkv, hd).index_copy_(0, slots, k)  # the chunks' own keys are in the cache, as in the layer
    v_cache.view(-1, Hkv, hd).index_copy_(0, slots, v)
    chunks = PrefillChunks.build([i * n for i in range(N)], [(i + 1) * n for i in range(N)], [c] * N, tables, device)
    call = (q, k, v, k_cache, v_cache, chunks, hd**-0.5)
    err = (paged_prefill_attention_triton(*call).float() - paged_prefill_attention(*call).float()).abs().max()
    return [f"prefill {N}x{n} ctx={c}", f"{time_us(lambda: paged_prefill_attention(*call), device):.1f}",
            f"{time_us(lambda: paged_prefill_attention_triton(*call), device):.1f}", f"{float(err):.2e}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--heads", type=int, nargs=3, default=[32, 8, 128], metavar=("H", "HKV", "HD"))
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--decode", nargs="+", default=["1x512", "16x512", "64x1024", "256x256"], help="BxSEQ_LEN")
    p.add_argument("--prefill", nargs="+", default=["1x2048x0", "4x512x0", "4x256x1024"],
                   help="NUM_CHUNKSxCHUNK_LENxCONTEXT_LEN")
    p.add_argument("--interpret", action="store_true", help="no GPU: tiny CPU run under TRITON_INTERPRET=1")
    args = p.parse_args(argv)

    if args.interpret:
        args.heads, args.decode, args.prefill, args.dtype = [4, 2, 32], ["2x40"], ["2x20x0", "2x20x17"], "fp32"
    device = bench_device("kernels.bench_attention", args.interpret)
    if device is None:
        return 0
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    rows = [["case", "torch us", "triton us", "max |triton - torch|"]]
    for spec in args.decode:
        B, L = (int(x) for x in spec.lower().split("x"))
        rows.append(bench_decode(B, L, args, device, dtype))
    for spec in args.prefill:
        N, n, c = (int(x) for x in spec.lower().split("x"))
        rows.append(bench_prefill(N, n, c, args, device, dtype))
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (TRITON_INTERPRET=1)"
    H, Hkv, hd = args.heads
    print(f"device {dev_name}, dtype {args.dtype}, H {H}, Hkv {Hkv}, hd {hd}, block_size {args.block_size}; "
          "microseconds per call (median)")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)))
    if args.interpret:
        print("(interpreter run: checks that every kernel launches; the timings mean nothing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
