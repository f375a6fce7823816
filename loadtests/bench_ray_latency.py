"""The latency Ray Serve adds per request: the same requests to `hotswap serve` and to
`hotswap serve --ray --replicas 1`, one at a time, the median of N each (docs/scale-out.md).

    python -m loadtests.bench_ray_latency [--requests 30] [--max-tokens 1 16] [--out DIR]

Both servers run the same engine settings (the embedded model, eager, float32) on this machine, one
after the other; the Ray run starts a local Ray instance of its own. For each max_tokens it prints the
median (and p90) wall time of a non-streamed greedy completion and of a streamed one's first token and
end, and the difference Ray makes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

from loadtests.servers import ServerProcess, free_port, hotswap_cmd

ENGINE_FLAGS = ["--enforce-eager", "--quantization", "none", "--kv-cache-tokens", "4096", "--max-num-seqs", "8", "--threads", "1"]
PROMPT = "The capital of France is"


def measure(url: str, requests: int, max_tokens: int) -> dict:
    """Medians over `requests` sequential requests (after 3 warm-up ones): whole response, first streamed token."""
    body = {"model": "SmolLM2-135M-Instruct", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    whole, first, last = [], [], []
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(requests + 3):
            t0 = time.perf_counter()
            r = client.post("/v1/completions", json=body)
            r.raise_for_status()
            t1 = time.perf_counter()
            t2 = None
            with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as s:
                for line in s.iter_lines():
                    if t2 is None and line.startswith("data: {"):
                        t2 = time.perf_counter()
            t3 = time.perf_counter()
            if i >= 3:
                whole.append(t1 - t0)
                first.append(t2 - t1)
                last.append(t3 - t1)
    return {"whole_ms": _summary(whole), "first_token_ms": _summary(first), "stream_end_ms": _summary(last)}


def _summary(seconds: list[float]) -> dict:
    ms = sorted(1000 * s for s in seconds)
    return {"median": round(statistics.median(ms), 1), "p90": round(ms[int(0.9 * (len(ms) - 1))], 1), "n": len(ms)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--max-tokens", type=int, nargs="+", default=[1, 16])
    p.add_argument("--out", type=Path, default=Path("var/bench-ray"))
    p.add_argument("--per-token-messages", action="store_true", help="also a Ray cell with --ray-stream-interval-ms 0")
    args = p.parse_args(argv)
    from server.models.embedded import ensure_embedded_model

    model_dir = ensure_embedded_model()
    results: dict = {}
    cells = [("hotswap serve", []), ("hotswap serve --ray --replicas 1", ["--ray", "--replicas", "1"])]
    if args.per_token_messages:  # the replica's stream batching off: one message per engine output (the first cut)
        cells.append(("... --ray-stream-interval-ms 0", ["--ray", "--replicas", "1", "--ray-stream-interval-ms", "0"]))
    for i, (label, extra) in enumerate(cells):
        port = free_port()
        cmd = hotswap_cmd(port, model_dir, [*ENGINE_FLAGS, "--store", str(args.out / "store"), *extra])
        with ServerProcess(label, cmd, f"http://127.0.0.1:{port}", args.out / f"cell{i}.log", ready_path="/health") as srv:
            results[label] = {"startup_s": round(srv.startup_s, 1)} | {f"max_tokens={n}": measure(srv.url, args.requests, n) for n in args.max_tokens}
        print(json.dumps({label: results[label]}, indent=1), flush=True)
    plain = results["hotswap serve"]
    for label, _ in cells[1:]:
        print(f"\nlatency `{label}` adds (median of", args.requests, "sequential requests, ms):")
        for n in args.max_tokens:
            key = f"max_tokens={n}"
            for what in ("whole_ms", "first_token_ms", "stream_end_ms"):
                a, b = plain[key][what]["median"], results[label][key][what]["median"]
                print(f"  {key:14s} {what:15s} plain {a:7.1f}  ray {b:7.1f}  added {b - a:+7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
