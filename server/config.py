"""Engine settings, filled from the CLI."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(slots=True)
class EngineConfig:
    model: Path | None = None  # None = the embedded SmolLM2
    served_model_name: str | None = None
    dtype: str = "float32"
    quantization: str = "auto"  # auto | none | int8 | int4 (server.models.quantize)
    quant_group_size: int = 32  # int4 group width (input columns per scale/zero)
    adapters: dict[str, Path] = field(default_factory=dict)  # name -> PEFT directory
    adapters_dir: Path | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_tokens: int = 32768
    block_size: int = 16
    max_model_len: int | None = None  # None = the model's context, capped by the KV cache
    max_lora_rank: int = 64
    adapter_memory_bytes: int | None = None  # device row-pool budget; None = unbounded
    threads: int | None = None
