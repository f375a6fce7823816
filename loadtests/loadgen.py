"""Async load generator for any OpenAI-compatible server (hotswap, vLLM, the naive baseline, ...).

Streams `POST /v1/completions` (`stream: true`, `stream_options.include_usage`) and measures per
request: time to first token (TTFT), time per output token after the first (TPOT), total latency and
the output tokens (the server's `usage` when it sends one, else the number of SSE chunks with text).

Load shapes:
- open loop, Poisson arrivals at `--rate R` requests/s, or
- closed loop, `--concurrency C` requests always in flight;
bounded by `--requests N` and/or `--duration S` (no new request after S seconds; in-flight ones finish).

Which `model` each request names (`--popularity`):
- `distinct`  round robin over the adapters: consecutive requests never share one
- `uniform`   uniformly at random
- `zipf:A`    Zipf(A): adapter k (1-based) has weight 1/k^A
- `identical` every request names the first adapter
- `base`      every request names the base model (`--base-model`, default: first id of /v1/models)
Adapter names: `--models a,b,c`, or `--model-pattern 'lora-{i:04d}' --num-adapters 1000` (i from 0).

Lengths: `fixed:N`, `uniform:A-B` (inclusive). Prompts are built from a fixed list of common English
words (about one token each with a leading space), different per request so no prefix cache helps.
Requests send `temperature: 0` and `ignore_eos: true` (hotswap and vLLM honour it; `--no-ignore-eos`
drops it for servers that reject it); the report always uses the tokens actually produced.

`--disconnect-prob p` closes a request's stream after a random number of chunks with probability p:
counted as injected disconnects, never as errors.

    python -m loadtests.loadgen --base-url http://127.0.0.1:8000 --model-pattern 'a{i:04d}' \\
        --num-adapters 100 --popularity zipf:1.1 --concurrency 16 --requests 200 \\
        --prompt-len uniform:32-64 --output-len fixed:32 --out var/bench/loadgen

Importable: `await run_load(LoadSpec(...))` returns a `LoadResult` (config, summary, records); with
`out_dir` set it also writes `<name>.json` and `<name>.png` there.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import numpy as np

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me back give most very "
    "after thing our just name good sentence man think say great where help through much before line right "
    "too mean old any same tell boy follow came want show also around form three small set put end does "
    "another well large must big even such because turn here why ask went men read need land different home "
    "us move try kind hand picture again change off play spell air away animal house point page letter mother "
    "answer found study still learn should world high every near add food between own below country plant "
    "last school father keep tree never start city earth eye light thought head under story saw left few "
    "while along might close something seem next hard open example begin life always those both paper "
    "together got group often run important until children side feet car mile night walk white sea began grow"
).split()


# -- pure helpers (tested directly) ------------------------------------------------------------

def poisson_arrivals(rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Send times (s from start) of n Poisson arrivals at `rate` per second: cumulative exponential gaps."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    return np.cumsum(rng.exponential(1.0 / rate, size=n))


def parse_length(spec: str) -> tuple[int, int]:
    """`fixed:N` or `uniform:A-B` -> (low, high) inclusive."""
    kind, _, arg = spec.partition(":")
    try:
        if kind == "fixed":
            n = int(arg)
            lo, hi = n, n
        elif kind == "uniform":
            a, _, b = arg.partition("-")
            lo, hi = int(a), int(b)
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"length {spec!r}: expected fixed:N or uniform:A-B") from None
    if lo < 1 or hi < lo:
        raise ValueError(f"length {spec!r}: need 1 <= A <= B")
    return lo, hi


def parse_popularity(spec: str) -> tuple[str, float]:
    kind, _, arg = spec.partition(":")
    if kind == "zipf":
        alpha = float(arg) if arg else 1.0
        if alpha <= 0:
            raise ValueError("zipf alpha must be > 0")
        return kind, alpha
    if kind in ("distinct", "uniform", "identical", "base") and not arg:
        return kind, 0.0
    raise ValueError(f"popularity {spec!r}: expected distinct, uniform, zipf:A, identical or base")


def adapter_names(pattern: str | None = None, count: int | None = None, names: list[str] | None = None) -> list[str]:
    """`names` as given, or `pattern.format(i=i)` for i in 0..count-1."""
    if names:
        return list(names)
    if pattern is None or not count:
        return []
    return [pattern.format(i=i) for i in range(count)]


def build_prompt(num_words: int, rng: np.random.Generator) -> str:
    return " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), size=num_words))


def percentiles(values: list[float], ps=(50, 90, 99)) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in ps} | {"mean": None}
    arr = np.asarray(values, dtype=float)
    return {f"p{p}": float(np.percentile(arr, p)) for p in ps} | {"mean": float(arr.mean())}


# -- spec / result -----------------------------------------------------------------------------

@dataclass
class LoadSpec:
    base_url: str
    adapters: list[str] = field(default_factory=list)
    popularity: str = "uniform"
    base_model: str | None = None  # for popularity "base"; None = first id of /v1/models
    rate: float | None = None  # Poisson arrivals per second (open loop)
    concurrency: int | None = None  # closed loop
    requests: int | None = None
    duration: float | None = None
    prompt_len: str = "fixed:32"
    output_len: str = "fixed:32"
    seed: int = 0
    disconnect_prob: float = 0.0
    ignore_eos: bool = True
    api_key: str | None = None
    timeout: float = 600.0
    name: str = "loadgen"
    out_dir: str | None = None
    progress: bool = True
    extra_body: dict = field(default_factory=dict)
    # optional: called for every new request, the adapter names right now (a list that grows during a
    # soak, say); replaces `adapters` for popularity distinct/uniform/zipf/identical
    adapters_live: Callable[[], list[str]] | None = None
    # optional: extra body fields for a request naming this model, merged over extra_body (llama-server
    # picks an adapter from a per-request `lora` list, not from `model`: loadtests/llama_cpp.body_hook)
    body_for_model: Callable[[str], dict] | None = None

    def validate(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate (open loop) or concurrency (closed loop)")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be > 0")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.requests is None and self.duration is None:
            raise ValueError("give requests and/or duration")
        kind, _ = parse_popularity(self.popularity)
        if kind != "base" and not self.adapters and self.adapters_live is None:
            raise ValueError(f"popularity {self.popularity!r} needs adapter names")
        if not 0 <= self.disconnect_prob <= 1:
            raise ValueError("disconnect_prob must be in [0, 1]")
        parse_length(self.prompt_len)
        parse_length(self.output_len)


@dataclass
class LoadResult:
    config: dict
    summary: dict
    records: list[dict]
    token_times: list[float] = field(default_factory=list, repr=False)  # s from start of every text chunk
    paths: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"config": self.config, "summary": self.summary, "records": self.records}


class _Plan:
    """The deterministic request sequence: model, prompt, lengths and injected disconnect per index."""

    def __init__(self, spec: LoadSpec, base_model: str | None):
        self.spec = spec
        self.kind, self.alpha = parse_popularity(spec.popularity)
        self.base_model = base_model
        self.rng = np.random.default_rng(spec.seed)
        self.p_lo, self.p_hi = parse_length(spec.prompt_len)
        self.o_lo, self.o_hi = parse_length(spec.output_len)
        self._cdfs: dict[int, np.ndarray] = {}
        self.items: list[dict] = []

    def _cdf(self, n: int) -> np.ndarray:
        if n not in self._cdfs:
            w = 1.0 / np.arange(1, n + 1) ** self.alpha
            self._cdfs[n] = np.cumsum(w / w.sum())
        return self._cdfs[n]

    def item(self, i: int) -> dict:
        while len(self.items) <= i:  # generated in order, so the sequence depends only on the seed
            self.items.append(self._next(len(self.items)))
        return self.items[i]

    def _next(self, i: int) -> dict:
        rng = self.rng
        names = self.spec.adapters_live() if self.spec.adapters_live is not None else self.spec.adapters
        if self.kind == "base":
            model = self.base_model
        elif self.kind == "distinct":
            model = names[i % len(names)]
        elif self.kind == "identical":
            model = names[0]
        elif self.kind == "uniform":
            model = names[int(rng.integers(len(names)))]
        else:
            model = names[min(int(np.searchsorted(self._cdf(len(names)), rng.random(), side="right")), len(names) - 1)]
        prompt_words = int(rng.integers(self.p_lo, self.p_hi + 1))
        max_tokens = int(rng.integers(self.o_lo, self.o_hi + 1))
        prompt = build_prompt(prompt_words, rng)
        disconnect_after = None
        if self.spec.disconnect_prob > 0 and rng.random() < self.spec.disconnect_prob:
            disconnect_after = int(rng.integers(1, max(2, max_tokens)))
        return {"model": model, "prompt": prompt, "prompt_words": prompt_words, "max_tokens": max_tokens, "disconnect_after": disconnect_after}


# -- one request -------------------------------------------------------------------------------

async def _one(client: httpx.AsyncClient, spec: LoadSpec, index: int, item: dict, t_start: float, token_times: list[float]) -> dict:
    body = {
        "model": item["model"], "prompt": item["prompt"], "max_tokens": item["max_tokens"], "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}, **spec.extra_body,
    }
    if spec.body_for_model is not None:
        body.update(spec.body_for_model(item["model"]))
    if spec.ignore_eos:
        body["ignore_eos"] = True
    rec = {
        "index": index, "model": item["model"], "prompt_words": item["prompt_words"], "max_tokens": item["max_tokens"],
        "start": None, "ttft": None, "latency": None, "tpot": None, "output_tokens": 0, "chunks": 0,
        "usage_tokens": None, "prompt_tokens": None, "status": "ok", "error": None, "http_status": None, "finish_reason": None,
    }
    t0 = time.perf_counter()
    rec["start"] = t0 - t_start
    first = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            rec["http_status"] = r.status_code
            if r.status_code >= 400:
                await r.aread()
                rec["status"], rec["error"] = "error", f"HTTP {r.status_code}"
                try:
                    rec["error_detail"] = (r.json().get("error") or {}).get("message", "")[:300]
                except Exception:
                    rec["error_detail"] = r.text[:300]
                rec["latency"] = time.perf_counter() - t0
                return rec
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    obj = json.loads(data)
                except json.JSONDecodeError:
                    rec["status"], rec["error"] = "error", "bad SSE JSON"
                    break
                if "error" in obj and "choices" not in obj:
                    rec["status"], rec["error"] = "error", "stream error"
                    rec["error_detail"] = str((obj["error"] or {}).get("message", ""))[:300]
                    break
                usage = obj.get("usage")
                if usage:
                    rec["usage_tokens"] = usage.get("completion_tokens")
                    rec["prompt_tokens"] = usage.get("prompt_tokens")
                for ch in obj.get("choices") or ():
                    if ch.get("finish_reason"):
                        rec["finish_reason"] = ch["finish_reason"]
                    if ch.get("text"):
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        rec["chunks"] += 1
                        token_times.append(now - t_start)
                if item["disconnect_after"] is not None and rec["chunks"] >= item["disconnect_after"]:
                    rec["status"] = "disconnected"  # injected: leaving the block closes the stream
                    break
            if rec["status"] == "ok" and not done:
                rec["status"], rec["error"] = "error", "stream ended without [DONE]"
    except Exception as e:  # noqa: BLE001 - every failure is a record, never a crash
        rec["status"], rec["error"] = "error", type(e).__name__
        rec["error_detail"] = str(e)[:300]
    end = time.perf_counter()
    rec["latency"] = end - t0
    rec["output_tokens"] = rec["usage_tokens"] if rec["usage_tokens"] is not None and rec["status"] == "ok" else rec["chunks"]
    if first is not None:
        rec["ttft"] = first - t0
        if rec["output_tokens"] > 1 and rec["status"] == "ok":
            rec["tpot"] = (end - first) / (rec["output_tokens"] - 1)
    return rec


# -- the run ------------------------------------------------------------------------------------

async def _base_model_id(client: httpx.AsyncClient) -> str:
    r = await client.get("/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def run_load(spec: LoadSpec) -> LoadResult:
    """Run the load described by `spec`; never raises for server-side failures (they are records)."""
    spec.validate()
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    in_flight_cap = spec.concurrency or max(64, int(math.ceil(spec.rate * 60)))
    limits = httpx.Limits(max_connections=in_flight_cap + 4, max_keepalive_connections=in_flight_cap + 4)
    timeout = httpx.Timeout(spec.timeout, connect=min(10.0, spec.timeout))
    records: list[dict] = []
    token_times: list[float] = []
    async with httpx.AsyncClient(base_url=spec.base_url.rstrip("/"), headers=headers, timeout=timeout, limits=limits) as client:
        base_model = spec.base_model
        if parse_popularity(spec.popularity)[0] == "base" and base_model is None:
            try:
                base_model = await _base_model_id(client)
            except Exception:  # noqa: BLE001 - unreachable server: requests will record the error
                base_model = "base"
        plan = _Plan(spec, base_model)
        bar = None
        if spec.progress:
            from tqdm import tqdm

            bar = tqdm(total=spec.requests, desc=spec.name, unit="req", file=sys.stderr, dynamic_ncols=True)
        t_start = time.perf_counter()
        deadline = t_start + spec.duration if spec.duration is not None else math.inf
        limit = spec.requests if spec.requests is not None else math.inf

        async def issue(i: int) -> None:
            rec = await _one(client, spec, i, plan.item(i), t_start, token_times)
            records.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(err=sum(r["status"] == "error" for r in records), refresh=False)

        if spec.concurrency is not None:
            counter = iter(range(10**12))

            async def worker() -> None:
                while True:
                    i = next(counter)
                    if i >= limit or time.perf_counter() >= deadline:
                        return
                    await issue(i)

            await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
        else:
            arrivals_rng = np.random.default_rng([spec.seed, 1])
            tasks, i, t_next = [], 0, 0.0
            while i < limit:
                t_next += float(poisson_arrivals(spec.rate, 1, arrivals_rng)[0])
                if t_start + t_next >= deadline:
                    break
                delay = t_start + t_next - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(issue(i)))
                i += 1
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - t_start
        if bar is not None:
            bar.close()
    records.sort(key=lambda r: r["index"])
    live, hook = spec.adapters_live, spec.body_for_model
    spec.adapters_live = spec.body_for_model = None  # not data: kept out of the JSON config
    config = asdict(spec)
    spec.adapters_live, spec.body_for_model = live, hook
    config["adapters_live"] = live is not None
    config["body_for_model"] = hook is not None
    config["adapters"] = {"count": len(spec.adapters), "first": spec.adapters[:3], "last": spec.adapters[-1:] if spec.adapters else []}
    config["base_model_resolved"] = base_model
    result = LoadResult(config=config, summary=summarize(records, wall, token_times), records=records, token_times=token_times)
    if spec.out_dir:
        save_result(result, Path(spec.out_dir), spec.name)
    return result


def summarize(records: list[dict], wall: float, token_times: list[float] | None = None) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    errors = [r for r in records if r["status"] == "error"]
    disc = [r for r in records if r["status"] == "disconnected"]
    ends = [r["start"] + r["latency"] for r in records if r["latency"] is not None]
    span = max(ends) if ends else wall
    out_tokens = sum(r["output_tokens"] for r in ok)
    delivered = sum(r["output_tokens"] for r in records if r["status"] != "error")
    per_model = Counter(r["model"] for r in records)
    series = []
    if token_times:
        bins = np.bincount(np.floor(np.asarray(token_times)).astype(int))
        series = [int(x) for x in bins]
    return {
        "requests": len(records), "ok": len(ok), "errors": len(errors), "disconnected_injected": len(disc),
        "errors_by_type": dict(Counter(r["error"] for r in errors)),
        "duration_s": span,
        "requests_per_s": len(ok) / span if span > 0 else 0.0,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / span if span > 0 else 0.0,
        "delivered_tokens_per_s": delivered / span if span > 0 else 0.0,
        "usage_reported": sum(r["usage_tokens"] is not None for r in ok),
        "ttft_s": percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
        "tpot_s": percentiles([r["tpot"] for r in ok if r["tpot"] is not None]),
        "latency_s": percentiles([r["latency"] for r in ok]),
        "distinct_models": len(per_model),
        "requests_per_model": dict(per_model.most_common()),
        "chunks_per_second": series,
    }


def save_result(result: LoadResult, out_dir: Path, name: str) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, ppath = out_dir / f"{name}.json", out_dir / f"{name}.png"
    jpath.write_text(json.dumps(result.to_json(), indent=1))
    plot_result(result, ppath)
    result.paths = {"json": str(jpath), "png": str(ppath)}
    return result.paths


def plot_result(result: LoadResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result.records if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ttft = [r["ttft"] * 1e3 for r in ok if r["ttft"] is not None]
    tpot = [r["tpot"] * 1e3 for r in ok if r["tpot"] is not None]
    axes[0].hist(ttft or [0], bins=30, color="tab:blue")
    axes[0].set(title="TTFT", xlabel="ms", ylabel="requests")
    axes[1].hist(tpot or [0], bins=30, color="tab:orange")
    axes[1].set(title="TPOT", xlabel="ms / token", ylabel="requests")
    series = result.summary.get("chunks_per_second") or []
    axes[2].plot(range(len(series)), series, color="tab:green")
    axes[2].set(title="output chunks (~tokens) per second", xlabel="s since start", ylabel="chunks/s")
    s = result.summary
    fig.suptitle(f"{result.config.get('name')}: {s['requests_per_s']:.2f} req/s, {s['output_tokens_per_s']:.1f} tok/s, "
                 f"{s['ok']} ok, {s['errors']} errors, {s['disconnected_injected']} disconnected")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def format_summary(s: dict) -> str:
    def ms(d: dict) -> str:
        return " ".join(f"{k} {v * 1e3:.1f}" if v is not None else f"{k} -" for k, v in d.items() if k != "mean")

    lines = [
        f"requests {s['requests']}: ok {s['ok']}, errors {s['errors']}, disconnected (injected) {s['disconnected_injected']}; "
        f"{s['distinct_models']} distinct models in {s['duration_s']:.1f} s",
        f"throughput: {s['requests_per_s']:.2f} req/s, {s['output_tokens_per_s']:.1f} output tokens/s",
        f"TTFT ms:    {ms(s['ttft_s'])}",
        f"TPOT ms:    {ms(s['tpot_s'])}",
        f"latency ms: {ms(s['latency_s'])}",
    ]
    if s["errors_by_type"]:
        lines.append("errors by type: " + ", ".join(f"{k}: {v}" for k, v in sorted(s["errors_by_type"].items())))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.loadgen", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (the /v1 paths are added)")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer")
    names = p.add_argument_group("adapters")
    names.add_argument("--models", default=None, help="comma-separated adapter (model) names")
    names.add_argument("--model-pattern", default=None, help="adapter name pattern with {i}, e.g. 'a{i:04d}'")
    names.add_argument("--num-adapters", type=int, default=None, help="how many names the pattern makes (1..1000+)")
    names.add_argument("--popularity", default="uniform", help="distinct | uniform | zipf:A | identical | base")
    names.add_argument("--base-model", default=None, help="model id for --popularity base (default: first of /v1/models)")
    load = p.add_argument_group("load")
    mode = load.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    mode.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    load.add_argument("--requests", type=int, default=None, help="number of requests")
    load.add_argument("--duration", type=float, default=None, help="seconds after which no new request is sent")
    load.add_argument("--prompt-len", default="fixed:32", help="prompt words (~tokens): fixed:N or uniform:A-B")
    load.add_argument("--output-len", default="fixed:32", help="max_tokens: fixed:N or uniform:A-B")
    load.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", help="do not send ignore_eos: true")
    load.add_argument("--disconnect-prob", type=float, default=0.0, help="probability a client closes its stream early")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--name", default="loadgen", help="run name: file stem of the JSON and PNG")
    p.add_argument("--out", default="var/bench/loadgen", help="directory for <name>.json and <name>.png ('' = none)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = LoadSpec(
        base_url=args.base_url, api_key=args.api_key,
        adapters=adapter_names(args.model_pattern, args.num_adapters, args.models.split(",") if args.models else None),
        popularity=args.popularity, base_model=args.base_model, rate=args.rate, concurrency=args.concurrency,
        requests=args.requests, duration=args.duration, prompt_len=args.prompt_len, output_len=args.output_len,
        seed=args.seed, disconnect_prob=args.disconnect_prob, ignore_eos=args.ignore_eos, timeout=args.timeout,
        name=args.name, out_dir=args.out or None, progress=args.progress,
    )
    try:
        spec.validate()
    except ValueError as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 2
    result = asyncio.run(run_load(spec))
    print(format_summary(result.summary))
    if result.paths:
        print(f"wrote {result.paths['json']} and {result.paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
