"""Where a decode step's time goes: torch.profiler over a few engine steps, top ops by self CPU time.

N sequences decode together, on the base model or spread over M rank-r LoRA adapters (Zipf);
the profile starts after the prefill, so it covers decode steps only.

    python -m loadtests.profile_step --adapters 100 --seqs 32
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.profiler import ProfilerActivity, profile

from loadtests.bench_adapters import write_random_adapters, zipf_choices
from server.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sequence import SamplingParams, Sequence


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=100, help="0: base model only")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="decode steps profiled")
    ap.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4", "w8a8"])
    ap.add_argument("--rows", type=int, default=20, help="ops listed")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    engine = LLMEngine(EngineConfig(max_num_seqs=args.seqs, kv_cache_tokens=16384, quantization=args.quantization))
    names: list[str] = []
    if args.adapters:
        with tempfile.TemporaryDirectory() as tmp:
            dirs = write_random_adapters(Path(tmp), engine.model.config, args.adapters, args.rank, args.targets.split(","), 0)
            for name, path in dirs.items():
                engine.load_adapter(name, path)
        names = sorted(dirs)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, engine.model.config.vocab_size, size=48).tolist() for _ in range(args.seqs)]
    adapters = zipf_choices(names, args.seqs, 1.1, 0) if names else [None] * args.seqs
    for p, a in zip(prompts, adapters):
        engine.add(Sequence(p, SamplingParams(max_tokens=3 * args.steps + 8, temperature=0.0, ignore_eos=True), a))
    for _ in range(args.steps + 1):  # prefill, then warm decode steps
        engine.step()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            engine.step()
    step_ms = (time.perf_counter() - t) / args.steps * 1e3
    print(f"{args.seqs} sequences, {len(set(a for a in adapters if a))} distinct adapters of {args.adapters}, "
          f"base {args.quantization}: {step_ms:.1f} ms per profiled decode step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
