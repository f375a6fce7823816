"""Per-step metadata that the model runner builds once and every layer reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kernels import LoraPlan


@dataclass(slots=True)
class PrefillChunk:
    """One sequence's prompt chunk: tokens [start, end) of the flat batch."""

    start: int
    end: int
    context_len: int  # tokens already in the KV cache before this chunk
    block_table: torch.Tensor  # [n_blocks] int64, covers context_len + (end - start) tokens


@dataclass(slots=True)
class ForwardContext:
    """Everything a forward pass needs besides token ids and positions.

    The flat batch holds the decode tokens first (one per sequence), then prefill chunks.
    """

    slot_mapping: torch.Tensor  # [T] int64: KV-cache slot written by each token
    num_decode: int
    decode_block_tables: torch.Tensor | None  # [B_dec, max_blocks] int64
    decode_mask: torch.Tensor | None  # [B_dec, 1, 1, max_blocks * block_size] bool, True = attend
    prefills: list[PrefillChunk] = field(default_factory=list)
    # pool space -> module name -> segment plan over the adapters of that space that target the
    # module (absent: none does); each space applies itself in AdaptedLinear (server.families.base.PoolSpace)
    plans: dict[Any, dict[str, LoraPlan]] = field(default_factory=dict)
    # per-step work of adapters beyond the plans, called by every decoder layer (server.families.base.StepHook)
    hooks: list[Any] = field(default_factory=list)
