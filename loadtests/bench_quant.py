"""Quantized base: tokens/s, memory and perplexity for none / int8 / int4 / w8a8, side by side in one run.

One engine per mode, all built up front with the same 100 rank-r LoRA adapters; every round runs
each (mode, batch, load) cell once, modes back to back, so the machine's drift shows up in all
modes alike; medians over rounds are reported, with ratios to the unquantized base.

    python -m loadtests.bench_quant --rounds 3 --plot docs/img/quantization.png
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from loadtests.bench_adapters import run_load, write_random_adapters, zipf_choices
from server.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.models.perplexity import perplexity
from server.models.quantize import weight_bytes

MODES = ("none", "int8", "int4", "w8a8")
TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "tinyshakespeare-40k.txt"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--batches", default="1,32", help="comma-separated numbers of concurrent sequences")
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ppl-tokens", type=int, default=2048, help="tokens of tests/data text scored per mode (0: skip)")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--plot", type=Path, default=None, help="write a PNG of tokens/s per cell")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    batches = [int(b) for b in args.batches.split(",")]
    engines = {m: LLMEngine(EngineConfig(max_num_seqs=max(batches), kv_cache_tokens=8192, quantization=m,
                                         quant_group_size=args.group_size)) for m in MODES}
    cfg = engines["none"].model.config
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_random_adapters(Path(tmp), cfg, args.adapters, args.rank, args.targets.split(","), seed=0)
        for eng in engines.values():
            for name, path in dirs.items():
                eng.load_adapter(name, path)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, cfg.vocab_size, size=args.prompt_len).tolist() for _ in range(max(batches))]
    names = sorted(dirs)
    print(f"model {engines['none'].model_name}, float32 compute, torch threads {torch.get_num_threads()}; "
          f"{args.adapters} adapters rank {args.rank} on {args.targets}; {args.prompt_len} prompt + {args.max_tokens} generated tokens")
    for m, eng in engines.items():
        print(f"  {m:5s} base weights {weight_bytes(eng.model) / 2**20:6.1f} MiB, adapter pools {eng.adapters.pool_bytes / 2**20:5.1f} MiB; "
              f"base kernels: {eng.kernels['base']}")

    cells = [(b, load) for b in batches for load in ("base", "adapters")]
    results: dict[tuple[str, int, str], list[float]] = {}
    for eng in engines.values():
        run_load(eng, prompts[:2], [None, names[0]], 4)  # warm-up
    for r in range(args.rounds):
        for b, load in cells:
            for m in (MODES if r % 2 == 0 else MODES[::-1]):
                if load == "base":
                    adapters = [None] * b
                else:  # batch 1: a different adapter each round; batch B: Zipf over all of them
                    adapters = [names[r % len(names)]] if b == 1 else zipf_choices(names, b, 1.1, seed=r)
                tps, _ = run_load(engines[m], prompts[:b], adapters, args.max_tokens)
                results.setdefault((m, b, load), []).append(tps)
        print(f"round {r + 1}/{args.rounds} done")

    print(f"\n{'batch':>5} {'load':>9} " + " ".join(f"{m + ' tok/s':>12}" for m in MODES) + "   " + " ".join(f"{m + '/none':>9}" for m in MODES[1:]))
    med = {k: statistics.median(v) for k, v in results.items()}
    for b, load in cells:
        row = [med[(m, b, load)] for m in MODES]
        print(f"{b:5d} {load:>9} " + " ".join(f"{v:12.1f}" for v in row) + "   " + " ".join(f"{v / row[0]:9.3f}" for v in row[1:]))
    for m in MODES:
        ratio = [med[(m, b, "adapters")] / med[(m, b, "base")] for b in batches]
        print(f"{m:5s}: {args.adapters} adapters / base-only " + ", ".join(f"batch {b}: {x:.3f}" for b, x in zip(batches, ratio)))

    if args.ppl_tokens:
        ids = engines["none"].tokenizer(TEXT.read_text())["input_ids"][:args.ppl_tokens]
        ppl = {m: perplexity(eng.model, ids) for m, eng in engines.items()}
        print(f"\nperplexity on {len(ids)} tokens of {TEXT.name} (windows of 256): " +
              ", ".join(f"{m} {p:.3f} ({(p / ppl['none'] - 1) * 100:+.2f} %)" for m, p in ppl.items()))
    if args.plot:
        _plot(args.plot, med, batches, args.adapters)
        print(f"plot: {args.plot}")


def _plot(path: Path, med: dict, batches: list[int], n_adapters: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4))
    for ax, b in zip(np.atleast_1d(axes), batches):
        x = np.arange(len(MODES))
        for i, load in enumerate(("base", "adapters")):
            ax.bar(x + (i - 0.5) * 0.38, [med[(m, b, load)] for m in MODES], 0.38,
                   label="base only" if load == "base" else f"{n_adapters} adapters")
        ax.set_xticks(x, MODES)
        ax.set_title(f"batch {b}")
        ax.set_ylabel("generated tokens/s")
        ax.legend()
    fig.suptitle("hotswap, SmolLM2-135M on 2 CPU cores: quantized base")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
