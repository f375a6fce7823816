"""What the comparison and the soak share: cached PEFT adapters on disk, and servers run as subprocesses."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ADAPTER_PATTERN = "lora-{i:04d}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def ensure_lora_adapters(model_dir: Path, root: Path, count: int, rank: int = 16,
                         targets: tuple[str, ...] = ("q_proj", "v_proj"), pattern: str = ADAPTER_PATTERN) -> list[tuple[str, Path]]:
    """`count` PEFT LoRA directories under root/r{rank}-{targets}/, adapter i seeded with i (so the
    first k of 1000 are the same k adapters as a run with k). Cached: only missing ones are written."""
    import torch

    from loadtests.synthetic import lora_files
    from server.models.config import ModelConfig

    base = root / f"r{rank}-{'-'.join(targets)}"
    base.mkdir(parents=True, exist_ok=True)
    cfg = None
    out = []
    for i in range(count):
        name = pattern.format(i=i)
        d = base / name
        if not (d / "adapter_model.safetensors").is_file():
            cfg = cfg or ModelConfig.from_dir(Path(model_dir))
            files = lora_files(cfg, torch.Generator().manual_seed(i), rank, tuple(targets))
            conf = json.loads(files["adapter_config.json"])
            # the fields PEFT writes, so vLLM and peft read the directory as their own
            conf.update({"base_model_name_or_path": str(model_dir), "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0,
                         "task_type": "CAUSAL_LM", "use_rslora": False, "use_dora": False, "modules_to_save": None,
                         "init_lora_weights": True, "inference_mode": True})
            tmp = base / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            (tmp / "adapter_model.safetensors").write_bytes(files["adapter_model.safetensors"])
            (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=1))
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)
        out.append((name, d))
    return out


def link_subset(adapters: list[tuple[str, Path]], into: Path) -> Path:
    """A directory holding symlinks to exactly these adapters (for `hotswap serve --adapters-dir`)."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    for name, path in adapters:
        (into / name).symlink_to(path.resolve(), target_is_directory=True)
    return into


def rss_bytes(pid: int, children: bool = True) -> int:
    """Resident set size of a process (and, by default, its descendants) from /proc."""
    total = 0
    pids = [pid]
    seen = set()
    while pids:
        p = pids.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
            if children:
                for task in Path(f"/proc/{p}/task").iterdir():
                    kids = (task / "children").read_text().split()
                    pids.extend(int(k) for k in kids)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


class ServerProcess:
    """A server started as a subprocess in its own session (so stopping it ends its children too)."""

    def __init__(self, name: str, cmd: list[str], url: str, log_path: Path, env: dict | None = None, cwd: Path | None = None,
                 ready_path: str = "/v1/models", start_timeout: float = 600.0):
        self.name, self.cmd, self.url, self.log_path = name, cmd, url, Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.cwd, self.ready_path, self.start_timeout = cwd, ready_path, start_timeout
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self._log.write("$ " + " ".join(self.cmd) + "\n")
        self._log.flush()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                     start_new_session=True)
        deadline = time.time() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                self._log.close()
                tail = self.log_path.read_text()[-3000:]
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting; log {self.log_path}:\n{tail}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {self.start_timeout:.0f} s; log {self.log_path}")
            time.sleep(0.5)
        self.startup_s = time.perf_counter() - t0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # its own session: the group id is its pid
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # stragglers of the group (vLLM's engine process)
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()


def hotswap_cmd(port: int, model_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--port", str(port), *extra]
