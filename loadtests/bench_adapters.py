"""Throughput with many adapters vs base only, side by side in one run (engine level, no HTTP).

The same closed-loop load (a fixed set of requests, all queued at once, `--max-num-seqs` running at a
time) is generated (a) on the base model only and (b) spread over N distinct rank-r LoRA adapters with
Zipf popularity. Each round runs both back to back, so drift of a noisy machine cancels in the
round's ratio; the median ratio is printed.

    python -m loadtests.bench_adapters --adapters 100 --rank 16 --rounds 9
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from server.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sequence import SamplingParams, Sequence
from loadtests.synthetic import lora_files
from server.models.config import ModelConfig


def write_random_adapters(root: Path, cfg: ModelConfig, count: int, rank: int, targets: list[str], seed: int) -> dict[str, Path]:
    """PEFT-format adapter directories with random weights."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(count):
        d = root / f"lora-{i:04d}"
        d.mkdir(parents=True)
        for name, data in lora_files(cfg, gen, rank, tuple(targets)).items():
            (d / name).write_bytes(data)
        out[d.name] = d
    return out


def zipf_choices(names: list[str], n: int, alpha: float, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(names) + 1) ** alpha
    return list(rng.choice(names, size=n, p=weights / weights.sum()))


def run_load(engine: LLMEngine, prompts: list[list[int]], adapters: list[str | None], max_tokens: int) -> tuple[float, float]:
    """Returns (generated tokens/s, mean distinct adapters per decode step)."""
    seqs = [Sequence(list(p), SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), a) for p, a in zip(prompts, adapters)]
    for s in seqs:
        engine.add(s)
    distinct = []
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
        distinct.append(engine.last_step.num_adapters)
    elapsed = time.perf_counter() - t0
    return sum(len(s.output_token_ids) for s in seqs) / elapsed, float(np.mean(distinct))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the embedded SmolLM2)")
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q_proj,v_proj", help="comma-separated target modules (PEFT's default for Llama: q_proj,v_proj)")
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--lora-dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="adapter pools (hotswap serve --lora-dtype)")
    ap.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4", "w8a8"], help="base weights (hotswap serve --quantization)")
    ap.add_argument("--enforce-eager", action="store_true", help="no compiled decode step for base-only steps either")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, lora_dtype=args.lora_dtype, quantization=args.quantization,
                                    enforce_eager=args.enforce_eager, max_num_seqs=args.max_num_seqs, kv_cache_tokens=16384))
    targets = args.targets.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_random_adapters(Path(tmp), engine.model.config, args.adapters, args.rank, targets, args.seed)
        for name, path in dirs.items():
            engine.load_adapter(name, path)
    rng = np.random.default_rng(args.seed)
    vocab = engine.model.config.vocab_size
    prompts = [rng.integers(100, vocab, size=args.prompt_len).tolist() for _ in range(args.requests)]
    lora = zipf_choices(sorted(dirs), args.requests, args.zipf, args.seed)
    base = [None] * args.requests
    print(f"model {engine.model_name} ({args.dtype}, base {engine.quantization}, LoRA pools {engine.lora_dtype_name}, "
          f"decode fast path: {engine.runner.graphs.describe() if engine.runner.graphs else 'eager'}), torch threads {torch.get_num_threads()}; {args.requests} requests x "
          f"{args.prompt_len} prompt + {args.max_tokens} generated tokens, {args.max_num_seqs} running at a time")
    print(f"adapters: {args.adapters} x rank {args.rank} on {','.join(targets)}, Zipf a={args.zipf}: "
          f"{len(set(lora))} distinct adapters in the load, adapter pools {engine.adapters.pool_bytes / 2**20:.0f} MiB")
    run_load(engine, prompts[:8], base[:8], 8)  # warm-up
    # Each round measures base and multi-adapter back to back (order alternating), so the machine's
    # drift between rounds cancels in the per-round ratio; the median ratio is the figure.
    base_tps, lora_tps, ratios = [], [], []
    for r in range(args.rounds):
        order = (("base", base), ("lora", lora)) if r % 2 == 0 else (("lora", lora), ("base", base))
        got, distinct = {}, {}
        for kind, adapters in order:
            got[kind], distinct[kind] = run_load(engine, prompts, adapters, args.max_tokens)
        base_tps.append(got["base"])
        lora_tps.append(got["lora"])
        ratios.append(got["lora"] / got["base"])
        print(f"round {r + 1:2d}: base {got['base']:6.1f} tokens/s, {args.adapters} adapters {got['lora']:6.1f} tokens/s "
              f"({distinct['lora']:.1f} distinct adapters per step), ratio {ratios[-1]:.3f}")
    print(f"median base-only    : {statistics.median(base_tps):7.1f} tokens/s")
    print(f"median {args.adapters} adapters : {statistics.median(lora_tps):7.1f} tokens/s")
    print(f"median per-round ratio multi-adapter / base-only: {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
