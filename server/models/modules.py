"""The logical modules adapters attach to, by the names Hugging Face checkpoints and PEFT configs use.

One set for the whole server: the model fuses q/k/v and gate/up into one GEMM each, but every
adapter family, file format and plan speaks of these seven names.
"""
from __future__ import annotations

from server.models.config import ModelConfig

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ADAPTER_MODULES = ATTN_MODULES + MLP_MODULES


def module_parent(module: str) -> str:
    """The submodule a logical module sits in: `self_attn` or `mlp`."""
    return "mlp" if module in MLP_MODULES else "self_attn"


def module_path(layer: int, module: str) -> str:
    """`model.layers.{layer}.self_attn.q_proj`: the module's key in a checkpoint and in PEFT patterns."""
    return f"model.layers.{layer}.{module_parent(module)}.{module}"


def module_dims(cfg: ModelConfig, module: str) -> tuple[int, int]:
    """(d_in, d_out) of a logical module of the base model."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
        "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d),
    }[module]
