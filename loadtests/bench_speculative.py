"""Speculative decoding by prompt lookup vs plain decoding, side by side in one run (engine level, no HTTP).

The same greedy requests (the load generator's random-word prompts, or chat prompts in the model's
template) run with and without n-gram drafts, `--seqs` at a time, alternating which goes first each
round so a noisy machine's drift falls on both; the median per-round ratio is the figure. Also printed:
how many draft tokens were proposed and accepted.

    python -m loadtests.bench_speculative --seqs 1,4,8 --rounds 3
    python -m loadtests.bench_speculative --prompts chat --quantization w8a8 --tokens 2,4
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import numpy as np

from loadtests.loadgen import build_prompt
from server.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sequence import SamplingParams, Sequence
from server.engine.speculative import SpeculativeConfig

CHAT = ["Write a short story about a robot who learns to paint.", "Explain how a bicycle works, step by step.",
        "List the planets of the solar system with one fact about each.", "Summarise the plot of Romeo and Juliet.",
        "Write a Python function that reverses a linked list, and explain it.", "Describe your ideal weekend."]


def prompts_for(engine: LLMEngine, kind: str, n: int, seed: int) -> list[list[int]]:
    if kind == "chat":
        tok = engine.tokenizer
        texts = [tok.apply_chat_template([{"role": "user", "content": CHAT[i % len(CHAT)]}], add_generation_prompt=True, tokenize=False) for i in range(n)]
    else:
        rng = np.random.default_rng(seed)
        texts = [build_prompt(48, rng) for _ in range(n)]
    return [engine.tokenizer.encode(t) for t in texts]


def run(engine: LLMEngine, prompts: list[list[int]], seqs: int, max_tokens: int) -> float:
    """Generated tokens/s of all prompts, `seqs` running at a time."""
    todo = [Sequence(list(p), SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)) for p in prompts]
    t0, running, done = time.perf_counter(), [], 0
    while todo or engine.has_work():
        while todo and len(running) < seqs:
            running.append(todo.pop(0))
            engine.add(running[-1])
        engine.step()
        done += sum(len(s.output_token_ids) for s in running if s.is_finished)
        running = [s for s in running if not s.is_finished]
    return done / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="1,4,8", help="comma-separated: sequences decoding together")
    ap.add_argument("--tokens", default="2", help="comma-separated num_speculative_tokens to compare")
    ap.add_argument("--prompts", choices=["random", "chat"], default="random", help="the load generator's random words, or chat prompts")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    engine = LLMEngine(EngineConfig(quantization=args.quantization, max_num_seqs=64))
    prompts = prompts_for(engine, args.prompts, args.requests, args.seed)
    run(engine, prompts[:1], 1, 8)  # warm-up
    print(f"{args.requests} {args.prompts} prompts x {args.max_tokens} greedy tokens, base {engine.quantization}")
    print("| seqs | k | plain tok/s | speculative tok/s | ratio (median of rounds) | drafted | accepted |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for seqs in (int(s) for s in args.seqs.split(",")):
        for k in (int(t) for t in args.tokens.split(",")):
            spec = engine.make_speculator(SpeculativeConfig(num_speculative_tokens=k, disable_by_batch_size=max(seqs, 1)))
            plain, fast, ratios = [], [], []
            for r in range(args.rounds):
                got = {}
                for kind in (("plain", "spec") if r % 2 == 0 else ("spec", "plain")):
                    engine.scheduler.speculator = spec if kind == "spec" else None
                    got[kind] = run(engine, prompts, seqs, args.max_tokens)
                engine.scheduler.speculator = None
                plain.append(got["plain"])
                fast.append(got["spec"])
                ratios.append(got["spec"] / got["plain"])
            print(f"| {seqs} | {k} | {statistics.median(plain):.1f} | {statistics.median(fast):.1f} | {statistics.median(ratios):.2f} "
                  f"| {spec.drafted} | {spec.accepted} ({spec.accepted / max(1, spec.drafted):.0%}) |", flush=True)


if __name__ == "__main__":
    main()
