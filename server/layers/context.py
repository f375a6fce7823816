"""Per-step metadata that the model runner builds once and every layer reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kernels import LoraPlan
from kernels.attention import PrefillChunks


@dataclass(slots=True)
class ForwardContext:
    """Everything a forward pass needs besides token ids and positions.

    The flat batch holds the decode tokens first (one per sequence), then prefill chunks. Every
    tensor is on the engine's device.
    """

    slot_mapping: torch.Tensor  # [T] int64: KV-cache slot written by each token
    num_decode: int
    decode_block_tables: torch.Tensor | None  # [B_dec, max_blocks] int64, padded with the null block
    decode_seq_lens: torch.Tensor | None  # [B_dec] int64: tokens each decoding sequence attends to (its new one included)
    prefill: PrefillChunks | None = None  # the prefill chunks, over rows num_decode.. of the flat batch
    # pool space -> module name -> segment plan over the adapters of that space that target the
    # module (absent: none does); each space applies itself in AdaptedLinear (server.families.base.PoolSpace)
    plans: dict[Any, dict[str, LoraPlan]] = field(default_factory=dict)
    # per-step work of adapters beyond the plans, called by every decoder layer (server.families.base.StepHook)
    hooks: list[Any] = field(default_factory=list)
    # the compiled CPU decode step's LoRA (server.engine.compiled_decode), instead of plans: module name ->
    # [S, 4] int64 segment table (tok_start, tok_end, row_start, rank) for the C++ op (kernels.cpu_lora)
    lora_segs: dict[str, torch.Tensor] | None = None


def prefill_context(slot_mapping: torch.Tensor, block_table: list[int], plans: dict | None = None) -> ForwardContext:
    """The context of one fresh prompt (no decode tokens, nothing cached before it) writing its keys
    to `slot_mapping` within `block_table`: for perplexity runs and tests that call the model directly."""
    n = slot_mapping.shape[0]
    chunks = PrefillChunks.build([0], [n], [0], [block_table], slot_mapping.device)
    return ForwardContext(slot_mapping, 0, None, None, chunks, plans or {})
