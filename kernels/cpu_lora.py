"""The C++ segmented LoRA op for the CPU (kernels/csrc/lora_cpu.cpp), built once per machine.

`get()` returns the op, torch.ops.hotswap.lora_segments, or None where it cannot be built (no C++
compiler, a torch without headers, HOTSWAP_CPU_LORA_OP=0): kernels.lora then runs its ATen path, the
same semantics. The build takes ~20-60 s the first time and is cached under
$HOTSWAP_HOME/torch_extensions (~/.cache/hotswap by default), keyed by the source, the torch version
and the CPU's instruction sets (it is compiled with -march=native, so a build from another machine is
never loaded). The engine calls get() at start-up, so no request pays for the build.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "lora_cpu.cpp"
MAX_RANK = 256  # the op's rank limit (kMaxRank)
_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> Path:
    home = os.environ.get("HOTSWAP_HOME")  # as server.models.embedded.hotswap_home (kernels/ never imports server/)
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "hotswap") / "torch_extensions"


def _build():
    from torch.utils import cpp_extension

    try:  # the ninja wheel's binary, whether or not the venv's bin is on PATH
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    except ImportError:
        pass
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + torch.backends.cpu.get_cpu_capability().encode()
                         + repr(sorted(k for k, v in torch.cpu.get_capabilities().items() if v) if hasattr(torch.cpu, "get_capabilities") else "").encode()).hexdigest()[:16]
    build = _cache_dir() / key
    build.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # torch's own build lock is a file that a killed build leaves behind, and every later load then waits on
    # it for ever. Builds here are serialised by an flock instead, which the kernel drops with its process:
    # holding it, any torch lock file present is such a leftover.
    with open(build / "hotswap.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stale = build / "lock"
        if stale.exists():
            log.warning("removing a build lock left by an interrupted build of the C++ LoRA op (%s)", stale)
            stale.unlink(missing_ok=True)
        cpp_extension.load(name=f"hotswap_lora_cpu_{key}", sources=[str(SOURCE)], build_directory=str(build),
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    log.info("C++ LoRA op for the CPU ready in %.1f s (%s)", time.perf_counter() - t0, build)
    op = torch.ops.hotswap.lora_segments

    @torch.library.register_fake("hotswap::lora_segments")
    def _(y, x, lora_a, lora_b, seg):  # what torch.compile traces: it only writes y in place
        return None

    return op


def get():
    """torch.ops.hotswap.lora_segments, or None if it is unavailable here (the reason is logged once)."""
    if "op" not in _state:
        with _lock:
            if "op" not in _state:
                op = None
                if os.environ.get("HOTSWAP_CPU_LORA_OP", "1") != "0":
                    try:
                        op = _build()
                    except Exception as e:  # no compiler, no headers, ...: the ATen path serves
                        log.warning("C++ LoRA op unavailable (%s); the ATen path serves LoRA on the CPU", str(e).splitlines()[0][:200])
                _state["op"] = op
    return _state["op"]
