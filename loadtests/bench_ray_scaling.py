"""Scale-out on Ray Serve (issue 15): 1 vs 2 engine replicas on this machine, and adapter-affinity routing
vs random routing, over a Zipf-popular working set larger than a replica's device adapter budget.

    python -m loadtests.bench_ray_scaling [--adapters 100] [--zipf 1.0] [--requests 160] [--concurrency 16]
                                          [--budget 16] [--cells process ray1x2 ray2x1 ray2x1-random]

One shared registry (a local directory) holds `--adapters` rank-16 q/v LoRAs of one tenant. Each cell is a
fresh server on it, with the same engine settings and the same device adapter budget per engine
(`--budget` adapters: `--adapter-memory-bytes` and `--max-adapters-per-replica`):

    process        `hotswap serve --threads 2` (no Ray): the reference
    ray1x2         `--ray --replicas 1 --replica-cpus 2 --threads 2`
    ray2x1         `--ray --replicas 2 --replica-cpus 1 --threads 1`, affinity routing (the default)
    ray2x1-random  the same, `--ray-routing random`: replicas chosen by load alone
    ray2x1-bounded affinity, `--max-ongoing-requests 8`: an adapter's requests overflow to the other replica sooner

and runs the same closed-loop load (loadtests.loadgen: `--concurrency` streams, Zipf over the adapters,
32-token prompts, `--max-tokens` generated, greedy, ignore_eos) after a warm-up. Per cell: output
tokens/s, TTFT p50/p90, the device tier's hit rate (hotswap_adapter_cache_{hits,misses}_total{tier=device}
over the run) and, for Ray, each replica's cold loads (device misses) from the admin's /health.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import torch

from loadtests.loadgen import LoadSpec, run_load
from loadtests.servers import ServerProcess, free_port, hotswap_cmd
from loadtests.synthetic import lora_files

ADMIN_KEY = "bench-ray-admin-key"
TENANT = "bench"
RANK, TARGETS = 16, ("q_proj", "v_proj")
ENGINE_FLAGS = ["--enforce-eager", "--quantization", "none", "--kv-cache-tokens", "8192", "--max-num-seqs", "16"]
CELLS = {
    "process": ["--threads", "2"],
    "ray1x2": ["--ray", "--replicas", "1", "--replica-cpus", "2", "--threads", "2"],
    "ray2x1": ["--ray", "--replicas", "2", "--replica-cpus", "1", "--threads", "1"],
    "ray2x1-random": ["--ray", "--replicas", "2", "--replica-cpus", "1", "--threads", "1", "--ray-routing", "random"],
    # affinity with a replica taking at most 8 requests at once: a hot adapter's overflow goes to the other replica sooner
    "ray2x1-bounded": ["--ray", "--replicas", "2", "--replica-cpus", "1", "--threads", "1", "--max-ongoing-requests", "8"],
}


def adapter_bytes(model_dir: Path) -> int:
    """What one rank-16 q/v LoRA takes in bf16 device pools."""
    from server.models.config import ModelConfig

    c = ModelConfig.from_dir(model_dir)
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return (c.hidden_size + q + c.hidden_size + kv) * RANK * c.num_layers * 2


async def build_store(store: Path, model_dir: Path, count: int) -> tuple[str, list[str]]:
    """A registry with one tenant and `count` adapters (reused if already built); (its API key, adapter names)."""
    from adapters_store import Registry, open_store
    from server.engine.llm_engine import base_fingerprint
    from server.models.config import ModelConfig
    from server.models.embedded import EMBEDDED_MODEL_NAME

    done = store / "bench-key.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved["count"] == count:
            return saved["key"], saved["names"]
    reg = Registry(open_store(str(store)))
    cfg = ModelConfig.from_dir(model_dir)
    base = base_fingerprint(EMBEDDED_MODEL_NAME, model_dir)  # the servers below serve it under its default name
    await reg.create_tenant(TENANT)
    _, key = await reg.create_key(TENANT)
    names = []
    for i in range(count):
        files = lora_files(cfg, torch.Generator().manual_seed(i), RANK, TARGETS)
        name = f"a{i:03d}"
        await reg.publish(TENANT, name, files, base_model=base, ranks={t: RANK for t in TARGETS}, target_modules=list(TARGETS))
        names.append(name)
    done.write_text(json.dumps({"count": count, "key": key, "names": names}))
    return key, names


def device_counters(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).text

    def value(name: str) -> float:
        m = re.search(rf'^{name}{{tier="device"}} ([0-9.e+]+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    return value("hotswap_adapter_cache_hits_total"), value("hotswap_adapter_cache_misses_total")


def replica_loads(url: str) -> dict[str, int]:
    health = httpx.get(url + "/health", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).json()
    replicas = health.get("engine", health).get("replicas") or {}
    return {rid[:8]: r.get("adapter_misses", 0) for rid, r in replicas.items()}


async def run_cell(url: str, key: str, names: list[str], args) -> dict:
    common = dict(base_url=url, adapters=names, popularity=f"zipf:{args.zipf}", prompt_len="fixed:32", api_key=key, progress=False,
                  output_len=f"fixed:{args.max_tokens}", ignore_eos=True)  # fmt: skip
    await run_load(LoadSpec(**common, concurrency=4, requests=8, seed=1))  # warm-up: compiled paths, first loads
    await asyncio.sleep(2.5)  # Ray: the board's next reports, so the counters below are the run's own
    hits0, misses0 = device_counters(url)
    loads0 = replica_loads(url)
    result = await run_load(LoadSpec(**common, concurrency=args.concurrency, requests=args.requests, seed=0))
    await asyncio.sleep(2.5)
    hits1, misses1 = device_counters(url)
    loads1 = replica_loads(url)
    s = result.summary
    hits, misses = hits1 - hits0, misses1 - misses0
    return {"ok": s["ok"], "errors": s["errors"], "tok_s": round(s["output_tokens_per_s"], 1),
            "ttft_p50_ms": round(1000 * s["ttft_s"]["p50"]), "ttft_p90_ms": round(1000 * s["ttft_s"]["p90"]),
            "device_hit_rate": round(hits / (hits + misses), 3) if hits + misses else None, "device_misses": int(misses),
            "cold_loads_per_replica": {r: loads1[r] - loads0.get(r, 0) for r in loads1}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--budget", type=int, default=16, help="adapters one engine's device pools hold")
    p.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS)[:4])
    p.add_argument("--out", type=Path, default=Path("var/bench-ray-scaling"))
    args = p.parse_args(argv)
    from server.models.embedded import ensure_embedded_model

    model_dir = Path(ensure_embedded_model())
    args.out.mkdir(parents=True, exist_ok=True)
    store = (args.out / "store").resolve()
    key, names = asyncio.run(build_store(store, model_dir, args.adapters))
    budget = ["--adapter-memory-bytes", str(args.budget * adapter_bytes(model_dir))]
    rows = {}
    for cell in args.cells:
        port = free_port()
        extra = [*ENGINE_FLAGS, *budget, *CELLS[cell], "--store", str(store), "--admin-key", ADMIN_KEY]
        if "--ray" in extra:
            extra += ["--max-adapters-per-replica", str(args.budget)]
        print(f"== {cell}: {' '.join(extra)}", flush=True)
        t0 = time.perf_counter()
        with ServerProcess(cell, hotswap_cmd(port, model_dir, extra), f"http://127.0.0.1:{port}", args.out / f"{cell}.log",
                           ready_path="/health") as server:  # fmt: skip
            started = time.perf_counter() - t0
            rows[cell] = asyncio.run(run_cell(server.url, key, names, args)) | {"startup_s": round(started, 1)}
        print(json.dumps(rows[cell]), flush=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "cells": rows}, indent=1))
    print(f"\n{args.adapters} adapters, zipf {args.zipf}, {args.concurrency} streams, {args.requests} requests x {args.max_tokens} tokens, "
          f"device budget {args.budget} adapters per engine")  # fmt: skip
    print("| cell | tokens/s | TTFT p50 (ms) | TTFT p90 (ms) | device hit rate | cold loads per replica |")
    print("|---|---|---|---|---|---|")
    for cell, r in rows.items():
        loads = ", ".join(str(v) for v in r["cold_loads_per_replica"].values()) or str(r["device_misses"])
        print(f"| {cell} | {r['tok_s']} | {r['ttft_p50_ms']} | {r['ttft_p90_ms']} | {r['device_hit_rate']} | {loads} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
