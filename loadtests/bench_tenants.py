"""Multi-tenant benchmark (issue 14), through the real HTTP server in this process, tenants calling with
their own API keys.

(a) Prefix caching: T tenants x A adapters each, every tenant with its own ~200-token system prompt
    in front of short questions; TTFT and tokens/s with prefix caching on vs off, the same requests,
    alternating cells in one run (the cache is emptied before each "on" cell, so it starts cold).
(b) Fair scheduling: two tenants, one flooding (many requests in flight), one light (a few in
    flight); the light tenant's TTFT p50/p99 and the total throughput under `fcfs` vs `fair`.

    python -m loadtests.bench_tenants                      # both, defaults below
    python -m loadtests.bench_tenants --only prefix --rounds 3
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from loadtests.bench_registry import Server
from loadtests.loadgen import percentiles
from loadtests.synthetic import lora_files
from server.adapters.service import build_adapter_service
from server.api.app import build_app
from server.config import EngineConfig
from server.engine.fairness import waiting_queue
from server.engine.llm_engine import LLMEngine

ADMIN_KEY = "bench-admin-key"
WORDS = ("bicycle shop customer repair order invoice delivery warranty helmet wheel brake chain saddle pedal frame "
         "refund policy opening hours appointment workshop rental insurance payment card receipt discount member").split()
QUESTIONS = ["Do you sell helmets?", "When do you open on Sunday?", "Can I rent a bike for a week?", "How long does a repair take?",
             "Do you deliver to Villeurbanne?", "Is there a student discount?", "Can I pay by card?", "What is the warranty on frames?"]


def system_prompt(tenant: int, words: int) -> str:
    rng = np.random.default_rng(tenant)
    return f"You are the assistant of shop number {tenant}. Rules: " + " ".join(rng.choice(WORDS, size=words)) + "."


async def setup(service, cfg, tenants: int, adapters_per_tenant: int, rank: int) -> dict[str, tuple[str, list[str]]]:
    """tenant -> (its API key, its adapter names)."""
    reg = service.registry
    gen = torch.Generator().manual_seed(0)
    out = {}
    for t in range(tenants):
        name = f"tenant{t:02d}"
        await reg.create_tenant(name)
        _, key = await reg.create_key(name)
        names = []
        for a in range(adapters_per_tenant):
            files = lora_files(cfg, gen, rank, ("q_proj", "v_proj"))
            await reg.publish(name, f"a{a}", files, base_model=service.base_model, ranks={"q_proj": rank, "v_proj": rank},
                              target_modules=["q_proj", "v_proj"])
            names.append(f"a{a}")
        out[name] = (key, names)
    return out


async def stream_one(client: httpx.AsyncClient, key: str, model: str, prompt: str, max_tokens: int,
                     chunk_times: list[float] | None = None) -> tuple[float, int]:
    """(seconds to the first token, tokens generated) of one streamed completion; the arrival time of
    every text chunk (~ a token each) goes to chunk_times."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                if first is None:
                    first = time.perf_counter() - t0
                if chunk_times is not None:
                    chunk_times.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (first if first is not None else time.perf_counter() - t0), tokens


async def closed_loop(client, jobs: list[tuple[str, str, str]], concurrency: int, max_tokens: int,
                      until: asyncio.Event | None = None, chunk_times: list[float] | None = None) -> tuple[list[float], float]:
    """Run (key, model, prompt) jobs with `concurrency` in flight (with `until`: cycling through them until
    it is set): (TTFTs, generated tokens/s)."""
    queue = list(reversed(jobs))
    ttfts, tokens = [], 0

    async def worker():
        nonlocal tokens
        while queue and not (until is not None and until.is_set()):
            key, model, prompt = queue.pop()
            if until is not None:
                queue.insert(0, (key, model, prompt))
            ttft, n = await stream_one(client, key, model, prompt, max_tokens, chunk_times)
            ttfts.append(ttft)
            tokens += n

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ttfts, tokens / (time.perf_counter() - t0)


async def bench_prefix(args, engine, client, tenants) -> None:
    rng = np.random.default_rng(1)
    systems = {t: system_prompt(i, args.system_words) for i, t in enumerate(tenants)}
    system_tokens = np.mean([len(engine.tokenizer(s)["input_ids"]) for s in systems.values()])
    jobs = []
    for i in range(args.requests):
        t = list(tenants)[rng.integers(len(tenants))]
        key, names = tenants[t]
        jobs.append((key, names[rng.integers(len(names))], systems[t] + "\nQ: " + QUESTIONS[rng.integers(len(QUESTIONS))] + "\nA:"))
    print(f"\n(a) prefix caching: {len(tenants)} tenants x {len(next(iter(tenants.values()))[1])} adapters, system prompts of "
          f"~{system_tokens:.0f} tokens, {args.requests} requests x {args.max_tokens} tokens, {args.concurrency} in flight")
    await closed_loop(client, jobs[:4], 4, 2)  # every tier warm: the first cell pays no registry loads
    await closed_loop(client, [(k, m, "warm") for k, names in tenants.values() for m in names], args.concurrency, 1)
    bm = engine.block_manager
    rows: dict[str, list] = {"on": [], "off": []}
    for r in range(args.rounds):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            bm.enable_prefix_caching = mode == "on"
            bm.reset_prefix_cache()
            hits0, queried0 = bm.hit_tokens, bm.queried_tokens
            ttfts, tps = await closed_loop(client, jobs, args.concurrency, args.max_tokens)
            hit_rate = (bm.hit_tokens - hits0) / max(1, bm.queried_tokens - queried0)
            p = percentiles(ttfts)
            rows[mode].append((tps, p["p50"], p["p99"]))
            print(f"  round {r + 1} prefix caching {mode:3s}: {tps:7.1f} tok/s   TTFT p50 {1000 * p['p50']:7.1f} ms  p99 {1000 * p['p99']:7.1f} ms"
                  f"   prompt tokens from the cache {hit_rate:.1%}")
    bm.enable_prefix_caching = True
    ratios = [on[0] / off[0] for on, off in zip(rows["on"], rows["off"])]
    ttft_ratios = [off[1] / on[1] for on, off in zip(rows["on"], rows["off"])]
    print(f"  per round, on/off: tokens/s {', '.join(f'{x:.2f}' for x in ratios)}; TTFT p50 off/on {', '.join(f'{x:.2f}' for x in ttft_ratios)}")


async def bench_fairness(args, engine, client, tenants) -> None:
    (heavy, (heavy_key, heavy_models)), (light, (light_key, light_models)) = list(tenants.items())[:2]
    prompt = "Tell me about bicycles. "
    heavy_jobs = [(heavy_key, heavy_models[i % len(heavy_models)], prompt + str(i)) for i in range(64)]
    light_jobs = [(light_key, light_models[i % len(light_models)], prompt + str(i)) for i in range(args.light_requests)]
    print(f"\n(b) fairness: {heavy} keeps {args.flood_concurrency} requests in flight for as long as {light} runs, {light} keeps "
          f"{args.light_concurrency} ({args.light_requests} in all), {args.max_tokens} tokens each; the engine runs {engine.scheduler.max_num_seqs} sequences at once")
    for r in range(args.rounds):
        for policy in (("fcfs", "fair") if r % 2 == 0 else ("fair", "fcfs")):
            engine.scheduler.waiting = waiting_queue(policy)
            light_done, chunks = asyncio.Event(), []
            flood = asyncio.ensure_future(closed_loop(client, heavy_jobs, args.flood_concurrency, args.max_tokens, light_done, chunks))
            await asyncio.sleep(2.0)  # the flood's queue builds up first
            t0 = time.perf_counter()
            light_ttfts, _ = await closed_loop(client, light_jobs, args.light_concurrency, args.max_tokens, chunk_times=chunks)
            t1 = time.perf_counter()
            light_done.set()
            heavy_ttfts, _ = await flood  # its requests in flight finish
            total = sum(1 for t in chunks if t0 <= t < t1) / (t1 - t0)  # both tenants' tokens while both were loading the server
            lp, hp = percentiles(light_ttfts), percentiles(heavy_ttfts)
            print(f"  round {r + 1} {policy:4s}: light TTFT p50 {1000 * lp['p50']:7.1f} ms  p99 {1000 * lp['p99']:7.1f} ms   "
                  f"heavy TTFT p50 {1000 * hp['p50']:7.1f} ms   total {total:6.1f} tok/s")
    engine.scheduler.waiting = waiting_queue("fair")


async def main_async(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="hotswap-bench-tenants-"))
    engine = LLMEngine(EngineConfig(model=args.model, max_num_seqs=args.max_num_seqs, kv_cache_tokens=args.kv_cache_tokens))
    service = build_adapter_service(engine, str(tmp / "store"), None, tmp / "cache", 1 << 40, 1 << 40)
    tenants = await setup(service, engine.model.config, args.tenants, args.adapters_per_tenant, args.rank)
    print(f"hotswap {engine.quantization}, {torch.get_num_threads()} threads; kernels: {engine.kernels}")
    async with Server(build_app(engine, api_key=ADMIN_KEY, adapter_service=service)) as srv, \
            httpx.AsyncClient(base_url=srv.url, timeout=600) as client:
        if args.only in (None, "prefix"):
            await bench_prefix(args, engine, client, tenants)
        if args.only in (None, "fairness"):
            await bench_fairness(args, engine, client, tenants)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--only", choices=("prefix", "fairness"), default=None)
    ap.add_argument("--tenants", type=int, default=20)
    ap.add_argument("--adapters-per-tenant", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--system-words", type=int, default=150, help="words of each tenant's system prompt (~1.3 tokens each)")
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--kv-cache-tokens", type=int, default=65536)
    ap.add_argument("--flood-concurrency", type=int, default=48)
    ap.add_argument("--light-requests", type=int, default=16)
    ap.add_argument("--light-concurrency", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
