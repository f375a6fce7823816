"""What the serving path costs one stream: `hotswap serve` over HTTP vs the engine alone, side by side.

Two processes run at once and take turns (order flipped every round, so a noisy machine's drift falls
on both): a `hotswap serve` answering streaming /v1/completions, and the engine alone stepping in a
process of its own (this module's `--worker` mode, fed prompts on stdin). Each request is one greedy
stream of `--max-tokens` tokens (EOS ignored); the rate is tokens / wall time of the request, TTFT
included. The median per-round ratio HTTP / engine is the figure.

    python -m loadtests.bench_serving_path --rounds 10
    python -m loadtests.bench_serving_path --serve-args "--quantization w8a8"
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time

import httpx

from loadtests.servers import ServerProcess, free_port, repo_root

PROMPTS = ["Tell me a story about a cat.", "List ten fruits and their colours.", "Explain how rain forms.",
           "Write a poem about the sea.", "What is an API? Give an example.", "Describe a busy market street."]


def worker(args: argparse.Namespace) -> None:
    """The engine alone: built and stepped on this process's main thread, one request per stdin line."""
    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from server.engine.sequence import SamplingParams, Sequence

    engine = LLMEngine(EngineConfig(quantization=args.quantization))
    print("ready", flush=True)
    for line in sys.stdin:
        seq = Sequence(engine.tokenizer.encode(line.strip()), SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True))
        t0 = time.perf_counter()
        engine.add(seq)
        first = None
        while engine.has_work():
            engine.step()
            first = first or time.perf_counter()
        print(json.dumps({"rate": args.max_tokens / (time.perf_counter() - t0), "ttft": first - t0}), flush=True)


def over_http(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    t0, first = time.perf_counter(), None
    with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter()
    return {"rate": max_tokens / (time.perf_counter() - t0), "ttft": first - t0}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--serve-args", default="--quantization none", help="`hotswap serve` flags (the engine alone gets its --quantization)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quantization", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return
    serve_args = shlex.split(args.serve_args)
    quant = serve_args[serve_args.index("--quantization") + 1] if "--quantization" in serve_args else "auto"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logs = repo_root() / "var/bench/serving-path"
    logs.mkdir(parents=True, exist_ok=True)
    server = ServerProcess("hotswap", [str(repo_root() / ".venv/bin/hotswap"), "serve", "--port", str(port), *serve_args], url, logs / "serve.log")
    alone = subprocess.Popen([sys.executable, "-m", "loadtests.bench_serving_path", "--worker", "--quantization", quant,
                              "--max-tokens", str(args.max_tokens)], cwd=repo_root(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        server.start()
        assert alone.stdout.readline().strip() == "ready"
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]

        def engine_alone(prompt: str) -> dict:
            alone.stdin.write(prompt + "\n")
            alone.stdin.flush()
            return json.loads(alone.stdout.readline())

        with httpx.Client(timeout=600) as client:
            http = lambda prompt: over_http(client, url, model, prompt, args.max_tokens)  # noqa: E731
            http(PROMPTS[0]), engine_alone(PROMPTS[0])  # warm-up
            got: dict[str, list[dict]] = {"http": [], "engine": []}
            for r in range(args.rounds):
                prompt = PROMPTS[r % len(PROMPTS)]
                order = (("http", http), ("engine", engine_alone)) if r % 2 == 0 else (("engine", engine_alone), ("http", http))
                for name, run in order:
                    got[name].append(run(prompt))
    finally:
        server.stop()
        alone.kill()
    med = lambda name, key: statistics.median(x[key] for x in got[name])  # noqa: E731
    ratio = statistics.median(h["rate"] / e["rate"] for h, e in zip(got["http"], got["engine"]))
    print(f"hotswap serve {args.serve_args!r}: one stream of {args.max_tokens} greedy tokens, {args.rounds} rounds")
    print(f"  engine alone : {med('engine', 'rate'):6.1f} tokens/s, TTFT {med('engine', 'ttft') * 1e3:5.0f} ms")
    print(f"  over HTTP    : {med('http', 'rate'):6.1f} tokens/s, TTFT {med('http', 'ttft') * 1e3:5.0f} ms")
    print(f"  median per-round ratio HTTP / engine alone: {ratio:.3f}")


if __name__ == "__main__":
    main()
