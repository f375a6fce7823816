"""The compiled decode step (server.engine.compiled_decode) vs eager decoding, side by side in one run.

One engine per quantization mode, compiled at start-up; each round decodes the same greedy requests
once through the compiled layers and once eagerly (the runner's fast path switched off), alternating
which goes first, so a noisy machine's drift falls on both. Prints decode tokens/s (prefill steps
excluded), the median ratio, and the start-up compile time. `--adapters N` spreads the requests over
N rank-16 seven-module LoRA adapters: steps with adapters decode eagerly in both columns (the
compiled path takes base-model steps only), so the ratio there should be 1.

    python -m loadtests.bench_compiled_decode --quantization none,int4,w8a8 --batches 1,8,32 --rounds 3
    python -m loadtests.bench_compiled_decode --quantization int4 --batches 1,16 --adapters 16
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import torch

from loadtests.synthetic import lora_files
from server.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sequence import SamplingParams, Sequence
from server.models.modules import ADAPTER_MODULES


def decode_rate(engine: LLMEngine, batch: int, adapters: list[str], steps: int) -> float:
    """Decode tokens/s of `batch` greedy sequences over `steps` steps after their prefill."""
    seqs = [Sequence(engine.tokenizer(f"Story number {i}: once upon a time")["input_ids"],
                     SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True),
                     adapters[i % len(adapters)] if adapters else None) for i in range(batch)]  # fmt: skip
    for s in seqs:
        engine.add(s)
    while any(s.num_computed_tokens < len(s.prompt_token_ids) for s in seqs):  # prefill (and the first token)
        engine.step()
    t0, tokens = time.perf_counter(), sum(len(s.output_token_ids) for s in seqs)
    while engine.has_work():
        engine.step()
    return (sum(len(s.output_token_ids) for s in seqs) - tokens) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantization", default="none,int4,w8a8", help="comma-separated base modes")
    ap.add_argument("--batches", default="1,8,32", help="comma-separated sequences decoding together")
    ap.add_argument("--adapters", type=int, default=0, help="distinct rank-16 seven-module LoRA adapters over the sequences")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.pop("TORCH_COMPILE_DISABLE", None)
    torch._dynamo.config.disable = False
    batches = [int(b) for b in args.batches.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; decode tokens/s, median of {args.rounds} rounds")
    print("| mode | adapters | batch | eager | compiled | compiled/eager | start-up compile |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode in args.quantization.split(","):
        engine = LLMEngine(EngineConfig(quantization=mode, max_num_seqs=max(batches)))
        compiled = engine.runner.graphs
        if compiled is None:
            raise SystemExit("no compiled decode path (TORCH_COMPILE_DISABLE=1, or not on the CPU)")
        g = torch.Generator().manual_seed(0)
        names = [f"a{i}" for i in range(args.adapters)]
        for name in names:
            engine.adapters.add(engine.parse_adapter(lora_files(engine.model.config, g, rank=16, targets=ADAPTER_MODULES), name))
        for b in batches:  # warm: caches, and any variant not compiled at start-up
            decode_rate(engine, b, names, 3)
        rates: dict[tuple[str, int], list[float]] = {(path, b): [] for path in ("eager", "compiled") for b in batches}
        for r in range(args.rounds):
            for b in batches:
                for path in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
                    engine.runner.graphs = compiled if path == "compiled" else None
                    rates[(path, b)].append(decode_rate(engine, b, names, args.steps))
        engine.runner.graphs = compiled
        for b in batches:
            e, c = statistics.median(rates[("eager", b)]), statistics.median(rates[("compiled", b)])
            print(f"| {mode} | {args.adapters} | {b} | {e:.1f} | {c:.1f} | {c / e:.2f} | {compiled.compile_seconds:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
