"""Registry and tiered-cache benchmark, through the real HTTP server in this process.

1. Latency to the first token for a rank-r adapter: cold (object store -> disk -> RAM -> device),
   warm switch (in host RAM, evicted from the device pools), hot (resident), and the base model.
2. N registered adapters under Zipf traffic, closed loop: a device budget holding 10 % of them vs one
   holding all of them, in one run; device/host hit rates and the throughput ratio.

    python -m loadtests.bench_registry --adapters 1000 --rank 16 --requests 256
    python -m loadtests.bench_registry --seaweedfs ...   # the store on a local SeaweedFS S3 server
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from loadtests.bench_adapters import zipf_choices
from loadtests.synthetic import lora_files
from server.adapters.service import build_adapter_service
from server.api.app import build_app
from server.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.models.modules import module_dims

TENANT = "bench"


async def publish_all(service, cfg, count: int, rank: int, targets: list[str]) -> list[str]:
    reg = service.registry
    if TENANT not in await reg.list_tenants():
        await reg.create_tenant(TENANT)
    existing = {m.name for m in await reg.list(TENANT)}
    gen = torch.Generator().manual_seed(0)
    names = [f"a{i:04d}" for i in range(count)]
    for name in names:
        if name in existing:
            continue
        files = lora_files(cfg, gen, rank, tuple(targets))
        await reg.publish(TENANT, name, files, base_model=service.base_model, ranks={m: rank for m in targets}, target_modules=targets)
    return names


class Server:
    """The app on a loopback port, driven from this process's event loop."""

    def __init__(self, app):
        import uvicorn

        from loadtests.servers import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))

    async def __aenter__(self):
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc):
        self.server.should_exit = True
        await self.task


async def ttft(client: httpx.AsyncClient, model: str) -> float:
    body = {"model": model, "prompt": "Hello there", "max_tokens": 1, "stream": True, "temperature": 0}
    t0 = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return time.perf_counter() - t0
    raise RuntimeError(f"no token from {model}: {r.status_code}")


async def closed_loop(client: httpx.AsyncClient, models: list[str], concurrency: int, max_tokens: int) -> float:
    """Generated tokens per second with `concurrency` requests in flight until `models` is exhausted."""
    queue = list(reversed(models))
    tokens = 0

    async def worker():
        nonlocal tokens
        while queue:
            model = queue.pop()
            r = await client.post("/v1/completions", json={"model": model, "prompt": "Tell me a story", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tokens / (time.perf_counter() - t0)


def metric(text: str, name: str, tier: str) -> float:
    prefix = f'{name}{{tier="{tier}"}}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


async def main_async(args) -> None:
    targets = args.targets.split(",")
    seaweed = None
    store = args.store
    if args.seaweedfs:
        import os

        from tests.s3_server import SeaweedS3

        seaweed = SeaweedS3().start()
        os.environ.update(AWS_ACCESS_KEY_ID=seaweed.access_key, AWS_SECRET_ACCESS_KEY=seaweed.secret_key, AWS_REGION="us-east-1")
        store = f"s3://{seaweed.bucket}/bench"
    tmp = Path(tempfile.mkdtemp(prefix="hotswap-bench-"))
    store = store or str(tmp / "store")
    engine = LLMEngine(EngineConfig(model=args.model, max_num_seqs=args.concurrency, kv_cache_tokens=16384))
    service = build_adapter_service(engine, store, args.s3_endpoint or (seaweed.endpoint if seaweed else None), tmp / "cache", 1 << 40, 1 << 40)
    cfg = engine.model.config
    t0 = time.perf_counter()
    names = await publish_all(service, cfg, args.adapters, args.rank, targets)
    per_adapter = args.rank * sum(sum(module_dims(cfg, m)) for m in targets) * 4 * cfg.num_layers
    print(f"store {service.registry.store.description}: {len(names)} adapters x rank {args.rank} on {','.join(targets)} "
          f"({per_adapter / 2**20:.2f} MiB each in float32) published in {time.perf_counter() - t0:.0f} s")

    # 1. latency to first token per tier (device room for exactly one adapter of this shape)
    engine.adapters.budget_bytes = per_adapter
    async with Server(build_app(engine, adapter_service=service)) as srv, httpx.AsyncClient(base_url=srv.url, timeout=300) as client:
        await ttft(client, engine.model_name)
        rows = {"base model": [], "cold (store)": [], "warm switch (host RAM -> device)": [], "hot (device)": []}
        for i in range(args.latency_samples):
            a, b = f"{TENANT}/{names[2 * i]}", f"{TENANT}/{names[2 * i + 1]}"
            rows["base model"].append(await ttft(client, engine.model_name))
            rows["cold (store)"].append(await ttft(client, a))
            rows["hot (device)"].append(await ttft(client, a))
            await ttft(client, b)  # evicts a from the device pools
            rows["warm switch (host RAM -> device)"].append(await ttft(client, a))
        print(f"\ntime to first token, median of {args.latency_samples} (prompt 'Hello there', 1 token):")
        for label, values in rows.items():
            print(f"  {label:34s} {1000 * statistics.median(values):8.1f} ms")

    # 2. Zipf traffic over all adapters: device budget 10 % vs 100 %, same requests, same warm disk cache
    rng_models = [f"{TENANT}/{n}" for n in zipf_choices(names, args.requests, args.zipf, seed=1)]
    print(f"\nZipf a={args.zipf} over {len(names)} adapters: {len(set(rng_models))} distinct in {args.requests} requests, "
          f"{args.concurrency} in flight, {args.max_tokens} tokens each")
    results = {}
    for label, fraction in (("all resident", 1.0), ("10% resident", 0.10)):
        engine.adapters.budget_bytes = int(per_adapter * len(names) * fraction) + per_adapter
        for key in list(engine.adapters.resident):
            engine.adapters.remove(key)
        async with Server(build_app(engine, adapter_service=service)) as srv, httpx.AsyncClient(base_url=srv.url, timeout=600) as client:
            if fraction == 1.0:  # warm every tier first so "all resident" means it
                await closed_loop(client, sorted(set(rng_models)), args.concurrency, 1)
            before = (await client.get("/metrics")).text
            tps = await closed_loop(client, rng_models, args.concurrency, args.max_tokens)
            after = (await client.get("/metrics")).text
            hits = {t: metric(after, "hotswap_adapter_cache_hits_total", t) - metric(before, "hotswap_adapter_cache_hits_total", t) for t in ("device", "host")}
            misses = {t: metric(after, "hotswap_adapter_cache_misses_total", t) - metric(before, "hotswap_adapter_cache_misses_total", t) for t in ("device", "host")}
            rate = {t: hits[t] / max(1.0, hits[t] + misses[t]) for t in hits}
            results[label] = tps
            print(f"  {label:13s}: {tps:7.1f} tokens/s   device hit rate {rate['device']:.1%}   host hit rate {rate['host']:.1%}   "
                  f"device evictions {metric(after, 'hotswap_adapter_evictions_total', 'device') - metric(before, 'hotswap_adapter_evictions_total', 'device'):.0f}")
    print(f"  throughput ratio 10% resident / all resident: {results['10% resident'] / results['all resident']:.3f}")
    if seaweed:
        seaweed.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--store", default=None, help="registry URL (default: a fresh local directory)")
    ap.add_argument("--s3-endpoint", default=None)
    ap.add_argument("--seaweedfs", action="store_true", help="run the store on a local SeaweedFS S3 server")
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--latency-samples", type=int, default=5)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    np.random.seed(0)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
