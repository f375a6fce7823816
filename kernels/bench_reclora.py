"""RecLoRA: bank formulation vs per-user materialised LoRA, µs per (layer, module) call.

    python -m kernels.bench_reclora
"""
from __future__ import annotations

import argparse
import time

import torch

from kernels import make_lora_plan, reclora_bank, sgmv_lora


def timed(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args(argv)
    d, r = args.d, args.rank
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, d_in = d_out = {d}, rank {r}; µs per call")
    print(f"{'K':>3} {'tokens':>6} {'users':>5} {'bank':>9} {'materialised':>13} {'materialise 1 user':>19}")
    for k in (8, 16):
        for tokens, users in ((1, 1), (32, 8), (32, 32), (64, 16)):
            g = torch.Generator().manual_seed(0)
            x, y = torch.randn(tokens, d, generator=g), torch.zeros(tokens, d)
            a_bank, b_bank = torch.randn(k, r, d, generator=g), torch.randn(k, d, r, generator=g)
            user_w = torch.softmax(torch.randn(users, k, generator=g), -1)
            owner = torch.arange(tokens) * users // tokens  # tokens grouped by user, as the engine orders them
            w_tok = user_w[owner]
            bank_us = timed(lambda: reclora_bank(y, x, a_bank, b_bank, w_tok, 1.0), args.reps)
            # materialised: each user an ordinary LoRA in the pools, the batch one segmented call
            lora_a = torch.einsum("uk,kri->uri", user_w, a_bank).reshape(users * r, d)
            lora_b = torch.einsum("uk,kor->uro", user_w, b_bank).reshape(users * r, d)
            counts = torch.bincount(owner, minlength=users).tolist()
            indptr = [0]
            for c in counts:
                indptr.append(indptr[-1] + c)
            plan = make_lora_plan(indptr, [u * r for u in range(users)], [r] * users)
            mat_us = timed(lambda: sgmv_lora(y, x, lora_a, lora_b, plan), args.reps)
            one_us = timed(lambda: (torch.einsum("k,kri->ri", user_w[0], a_bank), torch.einsum("k,kor->or", user_w[0], b_bank)), args.reps)
            print(f"{k:>3} {tokens:>6} {users:>5} {bank_us:>9.1f} {mat_us:>13.1f} {one_us:>19.1f}")


if __name__ == "__main__":
    main()
