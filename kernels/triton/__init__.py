"""Triton kernels (GPU; CPU under TRITON_INTERPRET=1) with the signatures of the torch ops in kernels.

triton is an optional dependency (extra "triton"): nothing here imports it until one of the ops is
looked up, so `import kernels.triton` works without it; `available()` says whether it can be used.
Run scripts as modules (python -m kernels.bench): a script inside kernels/ would put this folder
first on sys.path, and `import triton` would find this package instead of the real one.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["available", "sgmv_lora_triton", "s2ft_col_triton", "s2ft_row_triton", "routed_experts_triton",
           "paged_decode_attention_triton", "paged_prefill_attention_triton"]

_WHERE = {
    "sgmv_lora_triton": "kernels.triton.lora",
    "s2ft_col_triton": "kernels.triton.s2ft",
    "s2ft_row_triton": "kernels.triton.s2ft",
    "routed_experts_triton": "kernels.triton.experts",
    "int8_linear_triton": "kernels.triton.quant",
    "paged_decode_attention_triton": "kernels.triton.attention",
    "paged_prefill_attention_triton": "kernels.triton.attention",
}


def available() -> bool:
    """True when triton imports (it may still lack a GPU: launches then need TRITON_INTERPRET=1)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install raising at import time
        return False
    return True


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def bench_device(tool: str, interpret: bool):
    """The device a GPU benchmark (`python -m <tool>`) runs on: the CPU under TRITON_INTERPRET=1 for
    --interpret (a smoke run), else CUDA; None, after printing why, without a GPU or without triton."""
    import os

    import torch

    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(f"{tool}: CUDA is not available, nothing to benchmark (python -m {tool} --interpret runs a tiny CPU smoke check instead).")
        return None
    else:
        device = torch.device("cuda")
    if not available():
        print(f"{tool}: triton is not installed (pip install -e '.[triton]').")
        return None
    return device
