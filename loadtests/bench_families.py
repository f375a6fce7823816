"""Mixed adapter families vs plain LoRA vs base only, side by side in one run (engine level, no HTTP).

Loads (same prompts and lengths, closed loop, all queued at once):
  base      every request on the base model
  lora      requests spread over 20 rank-16 LoRAs (q_proj, v_proj)
  s2ft      ... over 8 S²FT adapters (3 % of v/up rows and o/down columns in every layer)
  reclora   ... over 16 users of one RecLoRA adapter (K=8 meta-LoRAs, rank 8, q/v; materialised per user)
  moe-lora  ... over 4 MixLoRA adapters (4 experts, top-2, rank 8 on gate/up/down, every layer)
  mixed     all of the above (and base) in the same batches
  mole      ... over 4 MoLE adapters (4 experts, sigmoid gates times per-sample global gates, rank 8; not in mixed)
Each round runs every load back to back; per-load ratios to base are per round, medians printed, with the
per-token overhead (1/tps - 1/tps_base) in ms.

    python -m loadtests.bench_families --rounds 5
"""
from __future__ import annotations

import argparse
import logging
import statistics

import numpy as np
import torch
from loadtests.bench_adapters import run_load
from loadtests.synthetic import lora_files, mixlora_files, reclora_files, s2ft_files
from server.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.families.registry import parse_adapter
from server.families.reclora import parse_reclora


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    engine = LLMEngine(EngineConfig(max_num_seqs=args.requests, kv_cache_tokens=16384))
    cfg, dtype, mgr = engine.model.config, engine.model.dtype, engine.adapters
    g = torch.Generator().manual_seed(0)
    names: dict[str, list[str]] = {"lora": [], "s2ft": [], "reclora": [], "moe-lora": []}
    for i in range(20):
        mgr.add(parse_adapter(lora_files(cfg, g), f"lora{i}", cfg, dtype, 64), pinned=True)
        names["lora"].append(f"lora{i}")
    for i in range(8):
        mgr.add(parse_adapter(s2ft_files(cfg, g), f"s2ft{i}", cfg, dtype, 64), pinned=True)
        names["s2ft"].append(f"s2ft{i}")
    bank = parse_reclora(reclora_files(cfg, g), "rec", cfg, 64)
    for u in range(16):
        w = torch.softmax(torch.randn(bank.num_meta, generator=g), -1)
        mgr.add(bank.materialize(f"rec#user{u}", w, dtype), pinned=True)
        names["reclora"].append(f"rec#user{u}")
    for i in range(4):
        mgr.add(parse_adapter(mixlora_files(cfg, g), f"moe{i}", cfg, dtype, 64), pinned=True)
        names["moe-lora"].append(f"moe{i}")
    mole = []
    for i in range(4):
        mgr.add(parse_adapter(mixlora_files(cfg, g, top_k=4, routing="sigmoid", global_gates=True), f"mole{i}", cfg, dtype, 64), pinned=True)
        mole.append(f"mole{i}")

    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, cfg.vocab_size, size=args.prompt_len).tolist() for _ in range(args.requests)]
    loads = {"base": [None] * args.requests}
    for family, pool in names.items():
        loads[family] = [pool[i % len(pool)] for i in range(args.requests)]
    every = [None] + [n for pool in names.values() for n in pool[:4]]
    loads["mixed"] = [every[i % len(every)] for i in range(args.requests)]
    loads["mole"] = [mole[i % len(mole)] for i in range(args.requests)]
    print(f"model {engine.model_name} (float32), torch threads {torch.get_num_threads()}; {args.requests} requests x "
          f"{args.prompt_len} prompt + {args.max_tokens} generated tokens per load, all running together")
    run_load(engine, prompts[:4], [None] * 4, 4)  # warm-up
    tps: dict[str, list[float]] = {k: [] for k in loads}
    for r in range(args.rounds):
        for kind, adapters in loads.items():
            tps[kind].append(run_load(engine, prompts, adapters, args.max_tokens)[0])
        print(f"round {r + 1}: " + ", ".join(f"{k} {tps[k][-1]:.1f}" for k in loads) + " tokens/s")
    print(f"\n{'load':9s} {'median tok/s':>12s} {'vs base (median of rounds)':>27s} {'overhead ms/token':>18s}")
    for kind in loads:
        ratios = [t / b for t, b in zip(tps[kind], tps["base"])]
        over = [1000 * (1 / t - 1 / b) for t, b in zip(tps[kind], tps["base"])]
        print(f"{kind:9s} {statistics.median(tps[kind]):12.1f} {statistics.median(ratios):27.3f} {statistics.median(over):18.2f}")


if __name__ == "__main__":
    main()
