"""The batched device sampler (server/engine/sampler.py) vs the per-row sampler it replaced, on the CPU.

The old sampler is read from git (`--old-rev`, default 032fc38: before issue 12) into a module of its
own; both run on the same logits, interleaved call by call so the machine's load hits both alike.
Median milliseconds per call, V = 49152 (SmolLM2's vocabulary).

    python -m loadtests.bench_sampler --batches 1,8,32
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import types
from pathlib import Path

import torch

from server.engine.sampler import sample
from server.engine.sequence import SamplingParams

CASES = {
    "greedy": dict(temperature=0.0),
    "temp 0.8": dict(temperature=0.8),
    "top-p 0.9": dict(temperature=0.8, top_p=0.9),
    "top-k 50": dict(temperature=0.8, top_k=50),
    "seeded temp": dict(temperature=0.8, seed=1),
    "seeded top-p": dict(temperature=0.8, top_p=0.9, seed=1),
}


def old_sampler(rev: str) -> types.ModuleType:
    repo = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:server/engine/sampler.py"], cwd=repo, check=True, capture_output=True, text=True).stdout
    module = types.ModuleType("old_sampler")
    exec(compile(source, f"{rev}:server/engine/sampler.py", "exec"), module.__dict__)
    return module


def interleaved(old, new, n: int) -> tuple[float, float]:
    old(), new()
    a, b = [], []
    for _ in range(n):
        t = time.perf_counter()
        old()
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        new()
        b.append(time.perf_counter() - t)
    return statistics.median(a) * 1e3, statistics.median(b) * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--old-rev", default="032fc38")
    args = ap.parse_args(argv)
    old = old_sampler(args.old_rev)
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}; median ms per call (old {args.old_rev} vs new)")
    print(f"{'case':14s} {'B':>3s} {'old':>8s} {'new':>8s} {'old/new':>8s}")
    for name, kw in CASES.items():
        for b in (int(v) for v in args.batches.split(",")):
            logits = torch.randn(b, 49152) * 3
            params = [SamplingParams(**kw) for _ in range(b)]
            positions = list(range(100, 100 + b))
            gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None for p in params]
            finite = torch.ones(b, dtype=torch.bool)  # the runner passes finiteness (from the hidden states)
            t_old, t_new = interleaved(lambda: old.sample(logits, params, gens, finite.tolist()),
                                       lambda: sample(logits, params, positions, finite).tolist(), 30 if b < 32 else 15)
            print(f"{name:14s} {b:3d} {t_old:8.2f} {t_new:8.2f} {t_old / t_new:8.2f}")


if __name__ == "__main__":
    main()
