"""The CPU's C++ segmented LoRA op (kernels.cpu_lora) vs the ATen path it replaces, per module call:
`python -m kernels.bench_lora_cpu [--pools 60] [--rounds 5]`.

A decode step over many adapters: 32 tokens over 20 distinct rank-16 adapters (12 with two tokens, 8
with one) out of 100 resident, for the embedded model's module shapes. Each timed call uses the next
of `--pools` different pool pairs, so the rows come from memory as in a real step (30 layers x 7
modules of pools, ~1.2 GB in bfloat16), not from a cache that holds one module's pools. Float32 and
bfloat16 pools under float32 activations; µs per call, the best of the rounds.
"""
from __future__ import annotations

import argparse
import time

import torch

from kernels import cpu_lora
from kernels.lora import make_lora_plan, sgmv_lora, sgmv_lora_reference

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # q/o, k/v, gate/up, down
ADAPTERS, RANK, TOKENS = 100, 16, 32


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", type=int, default=60, help="pool pairs cycled through (out of cache)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    op = cpu_lora.get()
    if op is None:
        raise SystemExit("the C++ op could not be built here (see the log)")
    g = torch.Generator().manual_seed(0)
    chosen = sorted(torch.randperm(ADAPTERS, generator=g)[:20].tolist())
    counts = [2] * 12 + [1] * 8
    indptr = [0]
    for n in counts:
        indptr.append(indptr[-1] + n)
    plan = make_lora_plan(indptr, [a * RANK for a in chosen], [RANK] * len(chosen))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {TOKENS} tokens over 20 of {ADAPTERS} rank-{RANK} "
          f"adapters; {args.pools} pool pairs cycled; µs per call (best of {args.rounds} rounds)")
    print(f"{'d_in->d_out':>12} {'pools':>9} {'ATen':>8} {'C++ op':>8} {'speedup':>8} {'max err':>9}")
    for d_in, d_out in SHAPES:
        x = torch.randn(TOKENS, d_in, generator=g)
        for dtype in (torch.float32, torch.bfloat16):
            pools = [((torch.randn(ADAPTERS * RANK, d_in, generator=g) * 0.05).to(dtype),
                      (torch.randn(ADAPTERS * RANK, d_out, generator=g) * 0.05).to(dtype)) for _ in range(args.pools)]
            times = {}
            for path in ("aten", "cpp"):
                cpu_lora._state["op"] = op if path == "cpp" else None
                y = torch.zeros(TOKENS, d_out)
                best = float("inf")
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    for a, b in pools:
                        sgmv_lora(y, x, a, b, plan)
                    best = min(best, (time.perf_counter() - t0) / len(pools))
                times[path] = best * 1e6
            cpu_lora._state["op"] = op
            y, ref = torch.zeros(TOKENS, d_out), torch.zeros(TOKENS, d_out)
            sgmv_lora(y, x, *pools[0], plan)
            sgmv_lora_reference(ref, x, *pools[0], plan)
            err = float((y - ref).abs().max() / ref.abs().max())
            print(f"{f'{d_in}->{d_out}':>12} {str(dtype)[6:]:>9} {times['aten']:8.1f} {times['cpp']:8.1f} "
                  f"{times['aten'] / times['cpp']:7.2f}x {err:9.1e}")


if __name__ == "__main__":
    main()
