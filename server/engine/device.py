"""Which device the engine runs on, its compute dtype, and how much KV cache fits there.

`--device auto` is CUDA when torch sees a GPU, else the CPU. A device that cannot be used is refused
before anything loads, in one line (DeviceUnavailable, a ValueError: the CLI prints it as
`hotswap: error: ...`). The `meta` device is accepted too: the placement test builds the whole
engine on it to prove that every tensor of a step is created on the engine's device.
"""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


class DeviceUnavailable(ValueError):
    """The requested device does not exist here (the message says what to use instead)."""


def resolve_device(spec: str | torch.device) -> torch.device:
    """`auto` | `cpu` | `cuda` | `cuda:N` (| `meta`, for tests) -> a device this process can use."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DeviceUnavailable(f"--device {spec!r} is not a device: use {DEVICE_CHOICES}") from None
    if device.type in ("cpu", "meta"):
        return torch.device(device.type)
    if device.type != "cuda":
        raise DeviceUnavailable(f"--device {spec}: hotswap serves on {DEVICE_CHOICES}, not {device.type}")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)"
        raise DeviceUnavailable(f"--device {spec}: {why}; serve with --device cpu (or auto), or use the CUDA image (docker build --build-arg TORCH_VARIANT=cu128 .)")
    count = torch.cuda.device_count()
    index = 0 if device.index is None else device.index
    if index >= count:
        raise DeviceUnavailable(f"--device {spec}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: float32 on the CPU (its fastest path here: docs/benchmarks.md), bfloat16 on CUDA, or
    float16 on GPUs without bfloat16 (before Ampere); an explicit name is taken as is."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"--dtype {name!r}: choose auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "meta":
        return torch.bfloat16  # the placement test builds what CUDA would
    return torch.float32


def resolve_lora_dtype(name: str, device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """dtype the LoRA pools are stored in (vLLM's --lora-dtype). `auto`: bfloat16 on the CPU, where a
    decode step over many adapters reads their pools from memory and bandwidth is the limit (half the
    bytes; the GEMMs still run in the model's dtype, accumulating in float32: kernels.lora); the
    model's dtype elsewhere."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"--lora-dtype {name!r}: choose auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cpu" and model_dtype == torch.float32 else model_dtype


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def kv_cache_tokens(requested: int | None, device: torch.device, bytes_per_token: int, utilization: float,
                    reserve_bytes: int = 0) -> int:
    """The KV cache's size in tokens: `requested` when given; on CUDA, what fits in `utilization` of the
    GPU's total memory beyond what is already used (weights, pools, `reserve_bytes` for activations),
    as vLLM's --gpu-memory-utilization; elsewhere 32768 tokens."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 32768
    free, total = torch.cuda.mem_get_info(device)
    budget = int(total * utilization) - (total - free) - reserve_bytes
    tokens = budget // max(1, bytes_per_token)
    if tokens <= 0:
        raise ValueError(f"no GPU memory is left for the KV cache at --gpu-memory-utilization {utilization} "
                         f"({(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB in use): raise it, lower "
                         "--adapter-memory-bytes, or quantize the base (--quantization int8/int4)")
    return int(tokens)
