"""`make gpu-check`: the GPU path on a CUDA GPU, in one bounded command that leaves one Markdown report.

Steps, one after the other, each timed and its output kept in the report even when it fails (the next
step runs anyway):
  tests       pytest -q tests/test_gpu.py: greedy parity with HF transformers + peft on the GPU, bf16 /
              int8 / int4 bases, every adapter family in one batch with the Triton kernels and with the
              torch ops, the KV cache sized from free memory
  kernels     python -m kernels.bench, kernels.bench_attention, kernels.bench_quant --device cuda
  throughput  hotswap vs vLLM on the GPU: the same model, the same N PEFT LoRA adapters and the same
              closed-loop streaming load as loadtests/compare.py (loadtests/loadgen.py), base only and N
              adapters on each server; vLLM with its CUDA defaults plus --enable-lora --max-loras
              --max-lora-rank, or "vLLM not installed: skipped" when it does not import
The report (default gpu-report.md) names the GPU, the torch / CUDA / triton / vLLM versions, the commit,
and every command run. Full step logs and the throughput artifacts go under --out. Without a CUDA GPU
it exits 2 after one line. Exit 1 when a step failed, else 0.

    python -m loadtests.gpu_check                                  # all steps, each bounded by its --*-timeout
    python -m loadtests.gpu_check --steps tests,kernels            # no servers
    python -m loadtests.gpu_check --steps throughput --adapters 100 --duration 30 --concurrency 64
    python -m loadtests.gpu_check --vllm-python /opt/vllm/bin/python --hotswap-args ''   # hotswap's own default base (int8)
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.servers import repo_root

STEPS = ("tests", "kernels", "throughput")
BASE_NAME = "SmolLM2-135M-Instruct"
MAX_REPORT_OUTPUT = 40_000  # characters of one step's output in the report (the full log stays under --out)

# Run in a child process, so this one never holds a CUDA context (a server it starts gets the whole GPU).
PROBE = r"""
import json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available()}
if not info["available"]:
    info["reason"] = (f"this torch build ({torch.__version__}) has no CUDA support" if torch.version.cuda is None
                      else f"torch {torch.__version__} sees no CUDA GPU (check the driver and CUDA_VISIBLE_DEVICES)")
else:
    info["cudnn"] = torch.backends.cudnn.version()
    info["devices"] = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        info["devices"].append({"name": torch.cuda.get_device_name(i), "capability": f"{p.major}.{p.minor}",
                                "memory_gib": round(p.total_memory / 2**30, 1)})
print(json.dumps(info))
"""


def probe_cuda(python: str) -> dict:
    """torch's view of the GPUs, from a child process: {"available", "torch", "cuda", "devices" | "reason"}."""
    try:
        proc = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"available": False, "reason": "importing torch took over 5 minutes"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"available": False, "reason": f"torch does not import in {python} ({last})"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def vllm_version(python: str) -> str | None:
    """The installed vLLM distribution's version in `python`, without importing vllm (seconds); None if absent."""
    code = "import importlib.metadata as m, importlib.util as u; print(m.version('vllm') if u.find_spec('vllm') else '')"
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    version = proc.stdout.strip()
    return version if proc.returncode == 0 and version else None


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=repo_root(), timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=repo_root(), timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


# -- steps: a command, its timeout, its captured output --------------------------------------------

@dataclass
class Step:
    name: str
    cmd: list[str]
    timeout: float
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        """The command as one would type it (environment overrides first)."""
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()), *(shlex.quote(a) for a in self.cmd)])


@dataclass
class StepResult:
    step: Step
    rc: int | None  # None: killed at its timeout
    seconds: float
    output: str
    log: Path

    @property
    def ok(self) -> bool:
        return self.rc == 0


def terminal_line(raw: bytes) -> str:
    """What a terminal shows of one output line: progress bars redraw with \\r, keep the last drawing."""
    text = raw.decode("utf-8", errors="replace").rstrip("\r")
    return text.rsplit("\r", 1)[-1]


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's process group (the throughput step then stops its servers), SIGKILL a minute later."""
    for sig, grace in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, logs: Path, echo: bool = True) -> StepResult:
    """Run one step in its own process group, output shown live, logged in full and kept for the report;
    stopped (stop_group) at its timeout or on Ctrl-C."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{step.name}.log"
    lines: list[str] = []
    print(f"\n== {step.name}: {step.shell()}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as log_file:
        log_file.write(f"$ {step.shell()}\n")
        try:
            proc = subprocess.Popen(step.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=repo_root(),
                                    env={**os.environ, **step.env}, start_new_session=True)
        except OSError as e:
            lines.append(f"could not start: {e}")
            log_file.write(lines[-1] + "\n")
            return StepResult(step, 127, 0.0, lines[-1], log)

        def pump() -> None:
            for raw in iter(proc.stdout.readline, b""):
                if echo:
                    sys.stdout.buffer.write(raw)
                    sys.stdout.flush()
                line = terminal_line(raw.rstrip(b"\n"))
                lines.append(line)
                log_file.write(line + "\n")

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        rc: int | None
        try:
            rc = proc.wait(timeout=step.timeout)
        except subprocess.TimeoutExpired:
            rc = None
            stop_group(proc)
        except KeyboardInterrupt:  # its own session: Ctrl-C reaches only this process
            stop_group(proc)
            raise
        reader.join(timeout=30)
        seconds = time.perf_counter() - t0
        if rc is None:
            lines.append(f"[gpu-check: stopped after its {step.timeout:.0f} s timeout]")
            log_file.write(lines[-1] + "\n")
    print(f"== {step.name}: {'timed out' if rc is None else f'exit {rc}'} after {seconds:.0f} s", flush=True)
    return StepResult(step, rc, seconds, "\n".join(lines), log)


def plan_steps(args) -> list[Step]:
    py = sys.executable
    compiled = {"TRITON_INTERPRET": "0"}  # tests/conftest.py defaults it to 1 for the CPU suite
    steps = [Step("nvidia-smi", ["nvidia-smi"], 60)] if shutil.which("nvidia-smi") else []  # driver, CUDA, other processes
    if "tests" in args.steps:
        steps.append(Step("tests", [py, "-m", "pytest", "-q", "-rs", "tests/test_gpu.py", *shlex.split(args.pytest_args)],
                          args.tests_timeout, compiled))
    if "kernels" in args.steps:
        for module, extra in (("kernels.bench", []), ("kernels.bench_attention", []), ("kernels.bench_quant", ["--device", "cuda"])):
            steps.append(Step(module.replace("kernels.", ""), [py, "-m", module, *extra], args.bench_timeout, compiled))
    if "throughput" in args.steps:
        forwarded = ["--only-throughput", "--no-progress", "--out", str(args.out)]
        for flag in ("device", "dtype", "adapters", "rank", "concurrency", "duration", "rounds", "prompt_len", "output_len",
                     "popularity", "warmup_requests", "timeout", "server_start_timeout", "hotswap_args", "vllm_python",
                     "vllm_args", "vllm_max_loras", "adapters_root", "seed"):
            value = getattr(args, flag)
            if value is not None:
                forwarded += [f"--{flag.replace('_', '-')}={value}"]
        steps.append(Step("throughput", [py, "-m", "loadtests.gpu_check", *forwarded], args.throughput_timeout, compiled))
    return steps


# -- the report ---------------------------------------------------------------------------------------

def fenced(text: str) -> str:
    """A code block that no run of backticks inside the text can close."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def clipped(text: str, log: Path) -> str:
    if len(text) <= MAX_REPORT_OUTPUT:
        return text
    return f"[... first {len(text) - MAX_REPORT_OUTPUT} characters cut: full output in {log}]\n" + text[-MAX_REPORT_OUTPUT:]


def write_report(path: Path, header: dict, results: list[StepResult], pending: list[Step], throughput: dict | None) -> None:
    probe = header["probe"]
    lines = [
        "# hotswap GPU check", "",
        f"{header['started']}, `{header['command']}` at commit {header['commit']}.", "",
        "| | |", "|---|---|",
    ]
    for i, d in enumerate(probe["devices"]):
        lines.append(f"| GPU {i} | {d['name']} (compute capability {d['capability']}, {d['memory_gib']} GiB) |")
    lines += [
        f"| torch | {probe['torch']} (CUDA {probe['cuda']}, cuDNN {probe.get('cudnn')}) |",
        f"| triton | {header['triton']} |",
        f"| vLLM | {header['vllm']} |",
        f"| Python | {platform.python_version()} ({sys.executable}) |",
        f"| host | {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()} |",
        "", "## Steps", "", "| step | exit | time | command |", "|---|---|---:|---|",
    ]
    for r in results:
        status = "ok" if r.ok else ("**timed out**" if r.rc is None else f"**failed ({r.rc})**")
        if r.step.name == "tests" and r.rc == 5:
            status = "**nothing ran (5: every test skipped, see below)**"
        lines.append(f"| {r.step.name} | {status} | {r.seconds:.0f} s | `{r.step.shell()}` |")
    for s in pending:
        lines.append(f"| {s.name} | not run yet | | `{s.shell()}` |")
    if throughput is not None:
        lines += ["", "## Throughput", "", throughput.get("markdown") or "(no result: see the throughput output below)"]
    commands = [r.step.shell() for r in results]
    if throughput:
        commands += [f"(server) {c}" for c in throughput.get("commands", [])]
    lines += ["", "## Every command run", "", fenced("\n".join(commands) if commands else "(none yet)"), "", "## Output"]
    for r in results:
        lines += ["", f"### {r.step.name}", "", fenced(clipped(r.output, r.log) or "(no output)")]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(args.steps) - set(STEPS))
    if unknown:
        print(f"gpu-check: unknown step(s) {', '.join(unknown)}: choose from {', '.join(STEPS)}", file=sys.stderr)
        return 2
    probe = probe_cuda(sys.executable)
    if not probe["available"]:
        print(f"gpu-check: no CUDA GPU here: {probe['reason']}; nothing was run (it needs an NVIDIA GPU and a CUDA torch: "
              "the CUDA image, docker build --build-arg TORCH_VARIANT=cu128 .)", file=sys.stderr)
        return 2
    if args.only_throughput:
        return throughput_main(args)

    args.out = args.out.resolve()
    report = args.report.resolve()
    vllm = vllm_version(args.vllm_python)
    header = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "probe": probe, "commit": git_commit(), "triton": package_version("triton"),
        "command": "python -m loadtests.gpu_check " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "vllm": f"{vllm} (in {args.vllm_python})" if vllm else f"not installed in {args.vllm_python}",
    }
    steps = plan_steps(args)
    results: list[StepResult] = []
    throughput = None
    write_report(report, header, results, steps, throughput)
    print(f"gpu-check on {', '.join(d['name'] for d in probe['devices'])}: {len(steps)} steps, report {report}", flush=True)
    summary = args.out / "throughput" / "results.json"
    summary.unlink(missing_ok=True)  # a former run's: never reported as this one's
    for i, step in enumerate(steps):
        try:
            results.append(run_step(step, args.out / "logs"))
        except KeyboardInterrupt:
            print(f"\ngpu-check: interrupted in {step.name}; wrote {report} with the steps before it", file=sys.stderr)
            return 130
        if step.name == "throughput":
            throughput = json.loads(summary.read_text()) if summary.is_file() else {}
        write_report(report, header, results, steps[i + 1:], throughput)  # after every step: a stopped run keeps what ran
    failed = [r.step.name for r in results if not r.ok]
    print(f"\ngpu-check: {len(results) - len(failed)} of {len(results)} steps passed"
          + (f" (failed: {', '.join(failed)})" if failed else "") + f"; wrote {report}")
    return 1 if failed else 0


# -- the throughput step (its own process: --only-throughput) -------------------------------------------

def check_vllm(python: str) -> tuple[str | None, str]:
    """(version, "") when `import vllm` works in `python`, else (None, why)."""
    try:
        proc = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True, timeout=600)
    except OSError as e:
        return None, str(e)
    except subprocess.TimeoutExpired:
        return None, "import vllm took over 10 minutes"
    if proc.returncode != 0:
        return None, (proc.stderr.strip().splitlines() or ["import failed"])[-1]
    return proc.stdout.strip().splitlines()[-1], ""


def server_command(system: str, args, port: int, model_dir: Path, adapters: list[tuple[str, Path]], subset: Path) -> tuple[list[str], dict]:
    n = len(adapters)
    if system == "hotswap":
        extra = shlex.split(args.hotswap_args)
        cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--served-model-name", BASE_NAME,
               "--port", str(port), "--device", args.device, "--dtype", args.dtype, "--adapters-dir", str(subset),
               "--store", str(args.out / "store"), "--max-lora-rank", str(args.rank), "--log-level", "warning"]
        if "--max-num-seqs" not in extra:  # every request of the closed loop in the batch, as vLLM's larger default allows
            cmd += ["--max-num-seqs", str(max(64, args.concurrency))]
        if "--adapter-memory-bytes" not in extra:  # static adapters are pinned: the pools must hold all of them
            cmd += ["--adapter-memory-bytes", str(max(2 * 2**30, n * 8 * 2**20))]
        return cmd + extra, {}
    max_loras = args.vllm_max_loras or max(1, min(n, args.concurrency))
    cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name", BASE_NAME,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype, "--enable-lora", "--max-loras", str(max_loras),
           "--max-lora-rank", str(args.rank), "--max-cpu-loras", str(max(n, max_loras)), "--disable-log-stats",
           "--uvicorn-log-level", "warning", "--lora-modules", *(f"{name}={path.resolve()}" for name, path in adapters)]
    return cmd + shlex.split(args.vllm_args), {"TOKENIZERS_PARALLELISM": "false"}


def throughput_main(args) -> int:
    """Each system's server started once with N adapters, warmed up, then the base-only and the N-adapter
    load alternately (--rounds), then stopped; results.json / results.md under --out/throughput."""
    from loadtests import compare
    from loadtests.loadgen import run_load
    from loadtests.servers import ServerProcess, ensure_lora_adapters, free_port, link_subset
    from server.models.embedded import ensure_embedded_model

    def stop_on_sigterm(signum, frame):  # the parent's timeout: unwind, so the servers are stopped
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    args.out = args.out.resolve()
    out = args.out / "throughput"
    out.mkdir(parents=True, exist_ok=True)
    have_matplotlib = importlib.util.find_spec("matplotlib") is not None  # loadgen's per-run PNG

    model_dir = ensure_embedded_model(progress=False)
    adapters = ensure_lora_adapters(model_dir, args.adapters_root, args.adapters, rank=args.rank)
    names = [a for a, _ in adapters]
    subset = link_subset(adapters, args.out / "adapter-sets" / f"n{args.adapters}")
    systems = ["hotswap"]
    version, why = check_vllm(args.vllm_python)
    notes = [f"hotswap: `{args.hotswap_args or '(no extra flags)'}`, --device {args.device}, --dtype {args.dtype}"]
    if version:
        systems.append("vllm")
        notes.append(f"vLLM {version} ({args.vllm_python})")
    else:
        notes.append(f"vLLM not installed: skipped (`import vllm` in {args.vllm_python}: {why})")
    print("\n".join(notes), flush=True)

    cells: list[dict] = []
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "notes": notes,
              "commands": [], "servers": [], "rows": [], "markdown": ""}
    try:
        for system in systems:
            port = free_port()
            cmd, env = server_command(system, args, port, model_dir, adapters, subset)
            result["commands"].append(" ".join(shlex.quote(c) for c in ([f"{k}={v}" for k, v in env.items()] + cmd)))
            print(f"\n$ {result['commands'][-1][:2000]}", flush=True)
            srv = ServerProcess(system, cmd, f"http://127.0.0.1:{port}", args.out / "logs" / f"{system}-server.log", env=env,
                                cwd=repo_root(), start_timeout=args.server_start_timeout)
            try:
                srv.start()
            except RuntimeError as e:
                print(f"!! {system} did not start: {e}", flush=True)
                result["servers"].append({"system": system, "started": False, "error": str(e)[-3000:]})
                continue
            result["servers"].append({"system": system, "started": True, "startup_s": srv.startup_s})
            print(f"   {system} ready in {srv.startup_s:.0f} s; warming up ...", flush=True)
            try:
                compare.warm_up(args, srv.url, names, ["base", "lora"])
                for r in range(args.rounds):
                    for mode in (["base", "lora"] if r % 2 == 0 else ["lora", "base"]):
                        name = f"{system}-{mode}-n{args.adapters}-r{r}"
                        runs = out / "runs" if have_matplotlib else None
                        res = asyncio.run(run_load(compare.spec_for(args, srv.url, names, mode, name, args.duration, runs, args.seed + r)))
                        s = res.summary
                        cells.append({"system": system, "mode": mode, "adapters": args.adapters, "round": r, "summary": s,
                                      "records": [{k: rec[k] for k in ("ttft", "tpot", "latency", "status")} for rec in res.records]})
                        print(f"   {name:28s} {s['output_tokens_per_s']:8.1f} tok/s {s['requests_per_s']:6.2f} req/s  "
                              f"errors {s['errors']} ({s['distinct_models']} models)", flush=True)
            finally:
                srv.stop()
    finally:  # whatever ran is written, also when stopped at the timeout
        result["rows"] = compare.aggregate(cells)
        result["markdown"] = throughput_markdown(args, notes, result["rows"], result["servers"])
        (out / "results.json").write_text(json.dumps(result, indent=1))
        (out / "results.md").write_text(result["markdown"])
        print("\n" + result["markdown"], flush=True)
        print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0 if cells and all(s["started"] for s in result["servers"]) else 1


def throughput_markdown(args, notes: list[str], rows: list[dict], servers: list[dict]) -> str:
    def trio(d: dict, digits: int) -> str:
        return " / ".join(f"{d[k] * 1e3:.{digits}f}" if d.get(k) is not None else "-" for k in ("p50", "p90", "p99"))

    lines = [
        f"Closed loop, {args.concurrency} requests in flight, prompt {args.prompt_len} words, output {args.output_len} tokens "
        f"(EOS ignored), {args.duration:.0f} s per cell, {args.rounds} round(s); {args.adapters} rank-{args.rank} q_proj,v_proj "
        f"LoRA adapters, popularity {args.popularity}. " + "; ".join(notes) + ".",
        "",
        "| system | load | req/s | output tok/s | TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) | errors |",
        "|---|---|---:|---:|---|---|---:|",
    ]
    tps = {}
    for r in rows:
        load = "base only" if r["mode"] == "base" else f"{r['adapters']} adapters ({r['distinct_models']} used)"
        tps[(r["system"], r["mode"])] = r["output_tokens_per_s"]
        lines.append(f"| {r['system']} | {load} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | {trio(r['ttft_s'], 0)} | "
                     f"{trio(r['tpot_s'], 1)} | {r['errors']} |")
    ratios = []
    for system in ("hotswap", "vllm"):
        if tps.get((system, "base")) and (system, "lora") in tps:
            ratios.append(f"{system} adapters / base only: {tps[(system, 'lora')] / tps[(system, 'base')]:.2f}")
    if tps.get(("vllm", "lora")) and ("hotswap", "lora") in tps:
        ratios.append(f"hotswap / vLLM with adapters: {tps[('hotswap', 'lora')] / tps[('vllm', 'lora')]:.2f}")
    if ratios:
        lines += ["", "; ".join(ratios) + "."]
    for s in servers:
        lines.append(f"\n{s['system']}: " + (f"ready in {s['startup_s']:.0f} s." if s["started"] else f"did not start:\n\n{fenced(s['error'])}"))
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    p = argparse.ArgumentParser(prog="python -m loadtests.gpu_check", description=__doc__, formatter_class=Formatter)
    p.add_argument("--report", type=Path, default=Path("gpu-report.md"), help="the Markdown report")
    p.add_argument("--out", type=Path, default=repo_root() / "var/gpu-check", help="step logs and throughput artifacts")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated, in this order: " + ", ".join(STEPS))
    p.add_argument("--pytest-args", default="", help="extra pytest arguments for the tests step")
    p.add_argument("--tests-timeout", type=float, default=2700.0, help="seconds for the tests step")
    p.add_argument("--bench-timeout", type=float, default=900.0, help="seconds for each kernel benchmark")
    p.add_argument("--throughput-timeout", type=float, default=2400.0, help="seconds for the throughput step")
    t = p.add_argument_group("throughput")
    t.add_argument("--device", default="cuda", help="hotswap serve --device")
    # The checkpoint says float32: each server's `auto` would resolve it its own way, so both get the same.
    t.add_argument("--dtype", default="bfloat16", help="--dtype of both servers")
    t.add_argument("--adapters", type=int, default=100, help="LoRA adapters loaded in each server")
    t.add_argument("--rank", type=int, default=16, help="their rank (hotswap --max-lora-rank, vLLM --max-lora-rank)")
    t.add_argument("--concurrency", type=int, default=64, help="closed-loop requests in flight")
    t.add_argument("--duration", type=float, default=20.0, help="seconds per cell (no new request after it)")
    t.add_argument("--rounds", type=int, default=1, help="base/adapters alternations per server")
    t.add_argument("--prompt-len", default="uniform:32-96", help="prompt words (~tokens)")
    t.add_argument("--output-len", default="uniform:64-128", help="max_tokens (EOS ignored)")
    t.add_argument("--popularity", default="zipf:1.1", help="which adapter each request names")
    t.add_argument("--warmup-requests", type=int, default=32)
    t.add_argument("--timeout", type=float, default=300.0, help="per-request timeout (s)")
    t.add_argument("--server-start-timeout", type=float, default=900.0, help="seconds a server may take to become ready")
    t.add_argument("--hotswap-args", default="--quantization none",
                   help="extra `hotswap serve` flags; the default keeps the base unquantized like vLLM's ('' = hotswap's CUDA default, int8)")
    t.add_argument("--vllm-python", default=sys.executable, help="the Python whose vllm serves (vLLM is skipped when it does not import)")
    t.add_argument("--vllm-args", default="", help="extra vLLM api_server flags")
    t.add_argument("--vllm-max-loras", type=int, default=None, help="vLLM --max-loras (None: min(adapters, concurrency))")
    t.add_argument("--adapters-root", type=Path, default=repo_root() / "var/bench/adapters", help="cached PEFT adapters")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--only-throughput", action="store_true", help="run the throughput step alone, in this process (what the full check runs as its own process)")
    return p


if __name__ == "__main__":
    sys.exit(main())
