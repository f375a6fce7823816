"""Soak test: a hotswap server under mixed adapter traffic for a long time (default 10 minutes).

- a hotswap server subprocess with a fresh local registry, a device budget (`--adapter-memory-bytes`)
  and a host budget that hold only a few of the adapters, so the device and host tiers evict all along;
- a few static adapters (`--adapters-dir`, pinned: always hot), `--registry-adapters` uploaded through
  the admin API before the load, and one more uploaded every `--upload-every` seconds during it
  (each cold when its first request comes), plus the base model;
- closed-loop load from loadtests/loadgen.py, Zipf popularity over all of those (new uploads take a
  random rank), random client disconnects (`--disconnect-prob`, counted as injected);
- the server's RSS (/proc) sampled every `--sample-every` seconds.

Passes when: no errors other than the injected disconnects, memory flat (mean RSS of the last window
within `--rss-tolerance` of the first window's, windows of 60 s or a quarter of the run), evictions
happened, and /health answers 200 at the end. Writes var/bench/soak/soak.json and soak.png.

    python -m loadtests.soak                      # 10 minutes
    python -m loadtests.soak --duration 60        # smoke
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from loadtests.loadgen import LoadSpec, format_summary, run_load
from loadtests.servers import ServerProcess, ensure_lora_adapters, free_port, link_subset, repo_root

TENANT = "soak"
BASE_NAME = "SmolLM2-135M-Instruct"
ADAPTER_BYTES = 4 * 2**20  # a rank-16 q/v adapter of this model in the pools, rounded up (3.5 MiB of weights)


async def upload(client: httpx.AsyncClient, name: str, path: Path) -> None:
    files = [(f, (f, (path / f).read_bytes(), "application/octet-stream")) for f in ("adapter_config.json", "adapter_model.safetensors")]
    r = await client.post("/admin/v1/adapters", data={"tenant": TENANT, "name": name}, files=files)
    if r.status_code == 409:  # already there (a reused store)
        return
    r.raise_for_status()


def metric_totals(text: str) -> dict[str, float]:
    """Sums of the hotswap_adapter_* counters per (name, tier) from a Prometheus text page."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'^(hotswap_adapter_(?:evictions|cache_hits|cache_misses)_total)\{tier="(\w+)"\} ([0-9.e+]+)$', line)
        if m:
            out[f"{m.group(1)}[{m.group(2)}]"] = float(m.group(3))
    return out


def rss_verdict(samples: list[tuple[float, int]], duration: float, tolerance: float) -> dict:
    """First vs last window mean RSS, and the slope (MiB/min) of a least-squares line after the first window."""
    window = min(60.0, max(duration / 4, 1.0))
    t = np.array([s[0] for s in samples])
    rss = np.array([s[1] for s in samples], dtype=float) / 2**20
    first = rss[t <= t[0] + window] if len(t) else np.array([])
    last = rss[t >= t[-1] - window] if len(t) else np.array([])
    after = t > t[0] + window if len(t) else np.array([], dtype=bool)
    slope = float(np.polyfit(t[after] / 60, rss[after], 1)[0]) if after.sum() >= 3 else None
    first_mean = float(first.mean()) if len(first) else None
    last_mean = float(last.mean()) if len(last) else None
    growth = (last_mean - first_mean) / first_mean if first_mean else None
    return {"window_s": window, "first_window_mib": first_mean, "last_window_mib": last_mean, "growth": growth,
            "slope_mib_per_min_after_first_window": slope, "max_mib": float(rss.max()) if len(rss) else None,
            "flat": growth is not None and growth <= tolerance}


async def soak(args) -> dict:
    from server.models.embedded import ensure_embedded_model

    model_dir = ensure_embedded_model(progress=False)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    total = args.static_adapters + args.registry_adapters + int(args.duration // args.upload_every) + 1
    adapters = ensure_lora_adapters(model_dir, args.adapters_root, total)
    static = adapters[: args.static_adapters]
    registry = adapters[args.static_adapters:]
    static_dir = link_subset(static, out / "static-adapters")
    store = out / "store"
    if store.exists() and not args.keep_store:
        import shutil

        shutil.rmtree(store)
        shutil.rmtree(out / "cache", ignore_errors=True)
    port = free_port()
    device_bytes = args.adapter_memory_bytes or (args.static_adapters + args.device_slots) * ADAPTER_BYTES
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--served-model-name", BASE_NAME, "--port", str(port),
           "--adapters-dir", str(static_dir), "--store", str(store), "--cache-dir", str(out / "cache"),
           "--adapter-memory-bytes", str(device_bytes), "--host-adapter-bytes", str(args.host_adapter_bytes),
           "--max-lora-rank", "16", "--log-level", "warning", *shlex.split(args.hotswap_args)]
    srv = ServerProcess("hotswap", cmd, f"http://127.0.0.1:{port}", out / "server.log", cwd=repo_root(), start_timeout=600)
    srv.start()
    print(f"hotswap ready in {srv.startup_s:.1f} s (pid {srv.pid}); device budget {device_bytes / 2**20:.0f} MiB, "
          f"host budget {args.host_adapter_bytes / 2**20:.0f} MiB", flush=True)
    rng = np.random.default_rng(args.seed)
    samples: list[tuple[float, int]] = []
    uploads: list[dict] = []
    result: dict = {}
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            r = await client.post("/admin/v1/tenants", json={"name": TENANT})
            if r.status_code not in (201, 409):
                r.raise_for_status()
            pre, later = registry[: args.registry_adapters], registry[args.registry_adapters:]
            for name, path in pre:
                await upload(client, name, path)
            # Zipf over this list: static (hot) adapters first, then base, then registry ones in a shuffled order
            names = [n for n, _ in static] + [BASE_NAME] + [f"{TENANT}/{n}" for n, _ in pre]
            tail = names[len(static) + 1:]
            rng.shuffle(tail)
            names[len(static) + 1:] = tail
            print(f"{len(static)} static + {len(pre)} registry adapters + base; uploading {len(later)} more during the run", flush=True)
            t0 = time.perf_counter()
            stop = asyncio.Event()

            async def sampler():
                while not stop.is_set():
                    samples.append((time.perf_counter() - t0, srv.rss()))
                    try:
                        await asyncio.wait_for(stop.wait(), args.sample_every)
                    except asyncio.TimeoutError:
                        pass

            async def uploader():
                for name, path in later:
                    try:
                        await asyncio.wait_for(stop.wait(), args.upload_every)
                        return
                    except asyncio.TimeoutError:
                        pass
                    t = time.perf_counter() - t0
                    try:
                        await upload(client, name, path)
                        pos = int(rng.integers(len(static) + 1, len(names) + 1))
                        names.insert(pos, f"{TENANT}/{name}")  # cold until its first request
                        uploads.append({"t": t, "name": name, "rank": pos + 1, "ok": True})
                    except Exception as e:  # noqa: BLE001
                        uploads.append({"t": t, "name": name, "ok": False, "error": f"{type(e).__name__}: {e}"})

            spec = LoadSpec(base_url=srv.url, adapters_live=lambda: names, popularity=args.popularity, concurrency=args.concurrency,
                            duration=args.duration, prompt_len=args.prompt_len, output_len=args.output_len, seed=args.seed,
                            disconnect_prob=args.disconnect_prob, name="soak-load", out_dir=None, progress=not args.no_progress)
            tasks = [asyncio.create_task(sampler()), asyncio.create_task(uploader())]
            load = await run_load(spec)
            stop.set()
            await asyncio.gather(*tasks)
            samples.append((time.perf_counter() - t0, srv.rss()))
            health = await client.get("/health")
            metrics = metric_totals((await client.get("/metrics")).text)
    finally:
        srv.stop()
    s = load.summary
    rss = rss_verdict(samples, args.duration, args.rss_tolerance)
    evictions = metrics.get("hotswap_adapter_evictions_total[device]", 0)
    checks = {
        "no_errors": s["errors"] == 0,
        "uploads_ok": all(u["ok"] for u in uploads),
        "memory_flat": rss["flat"],
        "evictions_happened": evictions > 0,
        "health_ok_at_end": health.status_code == 200,
    }
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"device_budget_bytes": device_bytes},
        "passed": all(checks.values()), "checks": checks, "summary": s, "rss": rss, "metrics_end": metrics,
        "health_end": {"status": health.status_code, "body": health.json() if health.status_code < 500 else health.text},
        "uploads": uploads, "rss_samples": [{"t": t, "rss_bytes": b} for t, b in samples], "records": load.records,
    }
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    plot(result, load, out / "soak.png")
    return result


def plot(result: dict, load, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    t = [s["t"] for s in result["rss_samples"]]
    axes[0].plot(t, [s["rss_bytes"] / 2**20 for s in result["rss_samples"]], color="tab:blue")
    for u in result["uploads"]:
        axes[0].axvline(u["t"], color="tab:gray", alpha=0.25, lw=0.8)
    rv = result["rss"]
    axes[0].set(ylabel="server RSS (MiB)", title=f"RSS: first window {rv['first_window_mib']:.0f} MiB, last {rv['last_window_mib']:.0f} MiB "
                f"(growth {100 * (rv['growth'] or 0):+.1f} %); grey lines: uploads")
    series = result["summary"].get("chunks_per_second") or []
    axes[1].plot(range(len(series)), series, color="tab:green", lw=0.8)
    recs = result["records"]
    for status, color in (("disconnected", "tab:orange"), ("error", "tab:red")):
        xs = [r["start"] + (r["latency"] or 0) for r in recs if r["status"] == status]
        axes[1].plot(xs, [0] * len(xs), "|", color=color, ms=12, label=f"{status} ({len(xs)})")
    axes[1].legend(loc="upper right")
    axes[1].set(xlabel="s since start", ylabel="output chunks/s")
    fig.suptitle(f"hotswap soak: {'PASSED' if result['passed'] else 'FAILED'}  " + ", ".join(f"{k}={v}" for k, v in result["checks"].items()), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--popularity", default="zipf:0.8", help="over static, base and registry adapters (zipf:A, uniform, distinct)")
    p.add_argument("--prompt-len", default="uniform:16-96")
    p.add_argument("--output-len", default="uniform:8-48")
    p.add_argument("--disconnect-prob", type=float, default=0.1)
    p.add_argument("--static-adapters", type=int, default=2, help="--adapters-dir adapters (pinned)")
    p.add_argument("--registry-adapters", type=int, default=40, help="uploaded before the load")
    p.add_argument("--upload-every", type=float, default=15.0, help="seconds between uploads during the load")
    p.add_argument("--device-slots", type=int, default=6, help="registry adapters the device budget holds (with the static ones)")
    p.add_argument("--adapter-memory-bytes", type=int, default=None, help="device budget (default: from --device-slots)")
    p.add_argument("--host-adapter-bytes", type=int, default=16 * ADAPTER_BYTES, help="host-RAM budget for parsed adapters")
    p.add_argument("--sample-every", type=float, default=2.0, help="RSS sampling period (s)")
    p.add_argument("--rss-tolerance", type=float, default=0.05, help="allowed growth of mean RSS, last window vs first")
    p.add_argument("--hotswap-args", default="", help="extra `hotswap serve` flags")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapters-root", type=Path, default=repo_root() / "var/bench/adapters")
    p.add_argument("--out", type=Path, default=repo_root() / "var/bench/soak")
    p.add_argument("--keep-store", action="store_true", help="reuse the registry store of a previous run")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = asyncio.run(soak(args))
    print(format_summary(result["summary"]))
    rv = result["rss"]
    slope = rv["slope_mib_per_min_after_first_window"]
    print(f"RSS: first {rv['window_s']:.0f} s {rv['first_window_mib']:.0f} MiB, last {rv['window_s']:.0f} s {rv['last_window_mib']:.0f} MiB "
          f"({100 * (rv['growth'] or 0):+.1f} %), slope after the first window "
          f"{'-' if slope is None else f'{slope:+.1f}'} MiB/min, max {rv['max_mib']:.0f} MiB")
    m = result["metrics_end"]
    print("adapter tiers: " + ", ".join(f"{k.replace('hotswap_adapter_', '')} {v:.0f}" for k, v in sorted(m.items())))
    print(f"uploads during the run: {len(result['uploads'])} ({sum(not u['ok'] for u in result['uploads'])} failed); "
          f"/health at the end: {result['health_end']['status']}")
    print(("PASSED" if result["passed"] else "FAILED") + ": " + ", ".join(f"{k} {'ok' if v else 'NO'}" for k, v in result["checks"].items()))
    print(f"wrote {args.out / 'soak.json'} and {args.out / 'soak.png'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
