"""CPU micro-benchmark of sgmv_lora vs sgmv_lora_reference: `python -m kernels.bench_cpu [--dtype bf16] [--threads N]`.
`--s2ft` benchmarks the S²FT ops (s2ft_col / s2ft_row vs their references) instead (section at the end).

Decode-like batches (1 token per sequence), 64 resident rank-16 adapters, d_in=576 and
d_out in {576, 1536}. Prints µs per call (best mean over rounds, robust to a busy machine)
next to a plain base `x @ W.T` of the same shape for scale.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from typing import Callable

import torch

from kernels.lora import LoraPlan, make_lora_plan, sgmv_lora, sgmv_lora_reference

NUM_ADAPTERS = 64
RANK = 16


def time_us(fn: Callable[[], object], iters: int = 20, rounds: int = 15) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(rounds):  # min over rounds: other processes only ever add time
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best * 1e6


def decode_plan(pattern: str, num_tokens: int, seed: int = 0) -> LoraPlan:
    """One token per sequence; sequences grouped by adapter into segments."""
    rng = random.Random(seed)
    if pattern == "distinct":
        ids = list(range(num_tokens))
    elif pattern == "identical":
        ids = [0] * num_tokens
    elif pattern.startswith("zipf"):
        a = float(pattern.partition(":")[2] or 1.5)
        ids = rng.choices(range(NUM_ADAPTERS), weights=[1 / (k + 1) ** a for k in range(NUM_ADAPTERS)], k=num_tokens)
    else:
        raise ValueError(pattern)
    counts: dict[int, int] = {}
    for k in ids:
        counts[k] = counts.get(k, 0) + 1
    indptr = [0]
    for n in counts.values():
        indptr.append(indptr[-1] + n)
    return make_lora_plan(indptr, [k * RANK for k in counts], [RANK] * len(counts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps torch's default")
    ap.add_argument("--s2ft", action="store_true", help="benchmark the S²FT ops instead of sgmv_lora")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    if args.s2ft:
        main_s2ft(dtype, args.dtype)
        return
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"{NUM_ADAPTERS} resident adapters, rank {RANK}, decode (1 token/seq); µs per call; "
          f"load avg {os.getloadavg()[0]:.2f} (other processes inflate multi-thread timings)")
    print(f"{'d_in->d_out':>12} {'T':>3} {'pattern':>9} {'S':>3} {'path':>8} {'G*L':>7} "
          f"{'reference':>10} {'sgmv_lora':>10} {'speedup':>8} {'base x@W.T':>11}")
    d_in = 576
    for d_out in (576, 1536):
        a = torch.randn(NUM_ADAPTERS * RANK, d_in).div_(d_in ** 0.5).to(dtype)
        b = torch.randn(NUM_ADAPTERS * RANK, d_out).to(dtype)
        w = torch.randn(d_out, d_in).to(dtype)
        for T in (1, 32, 64):
            x = torch.randn(T, d_in).to(dtype)
            y = torch.zeros(T, d_out, dtype=dtype)
            t_base = time_us(lambda: x @ w.T)
            for pattern in ("distinct", "zipf:1.5", "identical"):
                plan = decode_plan(pattern, T)
                t_ref = time_us(lambda: sgmv_lora_reference(y, x, a, b, plan), iters=5 if T > 8 else 20)
                t_fast = time_us(lambda: sgmv_lora(y, x, a, b, plan))
                gl = f"{plan.num_groups}x{plan.group_len}" if plan.path == "batched" else "-"
                print(f"{d_in:>5}->{d_out:<5} {T:>3} {pattern:>9} {len(plan.lora_segs):>3} {plan.path:>8} {gl:>7} "
                      f"{t_ref:>10.1f} {t_fast:>10.1f} {t_ref / t_fast:>7.1f}x {t_base:>11.1f}")


# ---------------------------------------------------------------------------------------------
# S²FT: structured-sparse deltas (kernels.s2ft), same plans as LoRA with entries in place of rank rows.
# Column kind on down_proj-like 1536->576 (k = 46 selected input columns per adapter); row kind on
# k/v_proj-like 576->192 and gate/up-like 576->1536 (k cycling 6, 12, 18 selected output rows).

S2FT_CASES = (("col", 1536, 576, (46,)), ("row", 576, 192, (6, 12, 18)), ("row", 576, 1536, (6, 12, 18)))


def s2ft_plan(pattern: str, num_tokens: int, starts: list[int], ks: list[int], seed: int = 0) -> LoraPlan:
    """decode_plan with per-adapter first entry / entry count."""
    plan = decode_plan(pattern, num_tokens, seed)
    adapters = [o // RANK for o in plan.seg_row_start]
    return make_lora_plan(plan.seg_indptr, [starts[a] for a in adapters], [ks[a] for a in adapters])


def main_s2ft(dtype: torch.dtype, dtype_name: str) -> None:
    from kernels.s2ft import s2ft_col, s2ft_col_reference, s2ft_row, s2ft_row_reference

    ops = {"col": (s2ft_col, s2ft_col_reference), "row": (s2ft_row, s2ft_row_reference)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {dtype_name}, {NUM_ADAPTERS} resident "
          f"S²FT adapters, decode (1 token/seq); µs per call; load avg {os.getloadavg()[0]:.2f}")
    print(f"{'kind':>4} {'d_in->d_out':>12} {'k':>7} {'T':>3} {'pattern':>9} {'S':>3} {'path':>8} {'G*L':>7} "
          f"{'reference':>10} {'fast':>10} {'speedup':>8} {'base x@W.T':>11}")
    for kind, d_in, d_out, entry_counts in S2FT_CASES:
        ks = [entry_counts[a % len(entry_counts)] for a in range(NUM_ADAPTERS)]
        starts = [sum(ks[:a]) for a in range(NUM_ADAPTERS)]
        n, (limit, width) = sum(ks), ((d_in, d_out) if kind == "col" else (d_out, d_in))
        idx = torch.randint(0, limit, (n,))
        pool = torch.randn(n, width).div_(width ** 0.5).to(dtype)
        w = torch.randn(d_out, d_in).to(dtype)
        fast, ref = ops[kind]
        k_txt = "/".join(map(str, entry_counts))
        for T in (1, 32, 64):
            x = torch.randn(T, d_in).to(dtype)
            y = torch.zeros(T, d_out, dtype=dtype)
            t_base = time_us(lambda: x @ w.T)
            for pattern in ("distinct", "zipf:1.5", "identical"):
                plan = s2ft_plan(pattern, T, starts, ks)
                t_ref = time_us(lambda: ref(y, x, idx, pool, plan), iters=5 if T > 8 else 20)
                t_fast = time_us(lambda: fast(y, x, idx, pool, plan))
                gl = f"{plan.num_groups}x{plan.group_len}" if plan.num_groups else "-"
                print(f"{kind:>4} {d_in:>5}->{d_out:<5} {k_txt:>7} {T:>3} {pattern:>9} {len(plan.lora_segs):>3} "
                      f"{plan.path:>8} {gl:>7} {t_ref:>10.1f} {t_fast:>10.1f} {t_ref / t_fast:>7.1f}x {t_base:>11.1f}")


if __name__ == "__main__":
    main()
