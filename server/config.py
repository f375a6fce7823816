"""Engine settings, filled from the CLI."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from server.engine.speculative import SpeculativeConfig


@dataclass(slots=True)
class EngineConfig:
    model: Path | None = None  # None = the embedded SmolLM2
    served_model_name: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N (server.engine.device)
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16
    lora_dtype: str = "auto"  # auto (bfloat16 on the CPU, the model's dtype on CUDA) | float32 | bfloat16 | float16: LoRA pools
    quantization: str = "auto"  # auto | none | int8 | int4 (server.models.quantize)
    quant_group_size: int = 32  # int4 group width (input columns per scale/zero)
    adapters: dict[str, Path] = field(default_factory=dict)  # name -> PEFT directory
    adapters_dir: Path | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_tokens: int | None = None  # None: 32768 on CPU; on CUDA what fits in gpu_memory_utilization
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory hotswap may fill (weights, pools, KV cache)
    enforce_eager: bool = False  # decode steps run eagerly: no CUDA graphs on CUDA, no torch.compile on the CPU
    kernels: str = "auto"  # auto (Triton on CUDA when it imports, else torch) | triton | torch (kernels.dispatch)
    block_size: int = 16
    max_model_len: int | None = None  # None = the model's context, capped by the KV cache
    max_lora_rank: int = 64
    adapter_memory_bytes: int | None = None  # device row-pool budget; None = unbounded
    threads: int | None = None
    speculative: SpeculativeConfig | None = None  # n-gram speculative decoding (server.engine.speculative); None: off
    enable_prefix_caching: bool = True  # reuse full KV blocks of a shared prefix, per adapter identity (server.engine.block_manager)
    scheduling: str = "fair"  # fair (Virtual Token Counter across tenants) | fcfs (server.engine.fairness)
