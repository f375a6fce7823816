"""Turns scheduled sequences into tensors, runs the model and samples. The only engine part that touches tensors.

One step is four stages (as in nano-vllm): `prepare` lays the scheduled tokens out in plain Python
lists, `plan` turns them into the forward context (KV slots, attention tables, each pool space's
per-module segment plans, the step hooks of families that route), `forward` runs the model and
`sample` picks the next tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels import make_lora_plan
from server.engine.sampler import sample
from server.engine.scheduler import ScheduledSeq
from server.engine.sequence import Sequence
from server.families.base import HookedAdapter, SeqRows
from server.families.registry import FAMILIES, SPACES
from server.layers.context import ForwardContext, PrefillChunk
from server.lora.manager import AdapterManager
from server.models.llama import LlamaForCausalLM
from server.models.modules import ADAPTER_MODULES

# Spaces in the order their adapters' tokens are grouped within a step (any fixed order works).
SPACE_ORDER = tuple(sorted(SPACES))
BASE_KEY = (-1, -1, 0, frozenset())  # the adapter key of a base-model sequence


@dataclass(slots=True)
class StepResult:
    tokens: list[int | None]  # per scheduled sequence: its sampled token; None while it is still prefilling or if it failed
    failures: dict[int, str]  # scheduled index -> why that sequence failed (its own numbers, its sampling)
    num_adapters: int  # distinct adapters in the step


@dataclass(slots=True)
class StepLayout:
    """The step's tokens laid out flat, decode tokens first, each adapter's tokens contiguous: plain Python."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # KV-cache slot each token writes
    seg_indptr: list[int] = field(default_factory=lambda: [0])  # adapter segments over the tokens ...
    seg_keys: list[tuple] = field(default_factory=list)  # ... and each one's (space index, start, units, targets)
    decode_tables: list[list[int]] = field(default_factory=list)
    decode_lens: list[int] = field(default_factory=list)
    prefills: list[tuple[int, int, int, list[int]]] = field(default_factory=list)  # (token start, end, context length, block table)
    sample_rows: list[tuple[int, int]] = field(default_factory=list)  # (scheduled index, token row) of sequences that sample
    hooked: dict[str, list[int]] = field(default_factory=dict)  # adapter -> its token rows, for families with a step hook
    hooked_seqs: dict[str, list[tuple[int, int, int, int]]] = field(default_factory=dict)  # ... and per sequence (seq id, first row, end row, first position)
    num_adapters: int = 0


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, adapters: AdapterManager, num_blocks: int, block_size: int):
        self.model, self.adapters, self.block_size = model, adapters, block_size
        cfg = model.config
        # One block more than the block manager hands out: the null block, all zeros for ever, pads the
        # decode block tables. Attention masks padded and not-yet-written positions, but a mask only
        # zeroes their weight, and 0 x NaN is NaN: what sits in a position a sequence never wrote must
        # be finite, so fresh blocks are zeroed too (zero_blocks) before their first use.
        self.null_block = num_blocks
        shape = (num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim)
        for layer in model.layers:
            layer.attn.k_cache = torch.zeros(shape, dtype=model.dtype)
            layer.attn.v_cache = torch.zeros(shape, dtype=model.dtype)
        self.kv_cache_bytes = 2 * len(model.layers) * layer.attn.k_cache.nbytes
        self._generators: dict[int, torch.Generator] = {}
        self._seq_state: dict[int, dict] = {}  # seq id -> its adapter family's state across steps (SeqRows.state)

    def zero_blocks(self, blocks: list[int]) -> None:
        """Clear blocks just handed to sequences: a block's earlier owner may have left anything in it."""
        if not blocks:
            return
        index = torch.tensor(blocks, dtype=torch.long)
        for layer in self.model.layers:
            layer.attn.k_cache.index_fill_(0, index, 0)
            layer.attn.v_cache.index_fill_(0, index, 0)

    def release(self, seq: Sequence) -> None:
        self._generators.pop(seq.seq_id, None)

    def release_state(self, seq: Sequence) -> None:
        """Drop the family state of a sequence leaving the running batch (finished, failed, aborted or
        preempted: a preempted sequence is recomputed from its first token, with fresh state). The
        engine calls it whenever the scheduler lets a sequence's adapter go."""
        self._seq_state.pop(seq.seq_id, None)

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq]) -> StepResult:
        """The sampled token of every scheduled sequence, the sequences that failed alone, and the
        number of distinct adapters in the step."""
        layout = self.prepare(scheduled)
        ctx = self.plan(layout)
        hidden = self.forward(layout, ctx)
        result = self.sample(scheduled, layout, hidden)
        for hook in ctx.hooks:  # the step completed: hooks commit their per-sequence state
            hook.end_step()
        return result

    # -- prepare: scheduled sequences -> flat lists ----------------------------------------------
    def _adapter_key(self, seq: Sequence) -> tuple:
        """(space index, first unit, units the plan drives, target modules); BASE_KEY for the base model."""
        if seq.adapter is None:
            return BASE_KEY
        entry = self.adapters.get(seq.adapter)
        return (SPACE_ORDER.index(entry.space), entry.row_start, entry.plan_units, entry.targets)

    def prepare(self, scheduled: list[ScheduledSeq]) -> StepLayout:
        keys = [self._adapter_key(s.seq) for s in scheduled]
        is_decode = [s.num_new_tokens == 1 and s.seq.num_computed_tokens > 0 for s in scheduled]
        # decode tokens first, then prefill chunks; each group sorted by adapter so adapters form segments
        order = sorted(range(len(scheduled)), key=lambda i: (not is_decode[i], keys[i]))
        bs, out = self.block_size, StepLayout()
        for i in order:
            item, seq = scheduled[i], scheduled[i].seq
            start, n = seq.num_computed_tokens, item.num_new_tokens
            t0 = len(out.input_ids)
            out.input_ids += seq.token_ids(start, start + n)
            out.positions += range(start, start + n)
            table = seq.block_table
            out.slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            if is_decode[i]:
                out.decode_tables.append(table)
                out.decode_lens.append(start + 1)
            else:
                out.prefills.append((t0, t0 + n, start, table))
            if item.samples:
                out.sample_rows.append((i, t0 + n - 1))
            if seq.adapter is not None and self.adapters.get(seq.adapter).weights is not None:
                out.hooked.setdefault(seq.adapter, []).extend(range(t0, t0 + n))
                out.hooked_seqs.setdefault(seq.adapter, []).append((seq.seq_id, t0, t0 + n, start))
            if out.seg_keys and out.seg_keys[-1] == keys[i]:
                out.seg_indptr[-1] = t0 + n
            else:
                out.seg_indptr.append(t0 + n)
                out.seg_keys.append(keys[i])
        out.num_adapters = len({k for k in keys if k != BASE_KEY})
        return out

    # -- plan: flat lists -> the forward context -------------------------------------------------
    def plan(self, layout: StepLayout) -> ForwardContext:
        bs = self.block_size
        decode_tables = decode_mask = None
        if layout.decode_tables:
            width = max(len(t) for t in layout.decode_tables)
            decode_tables = torch.tensor([t + [self.null_block] * (width - len(t)) for t in layout.decode_tables], dtype=torch.long)
            lens = torch.tensor(layout.decode_lens)
            decode_mask = (torch.arange(width * bs).unsqueeze(0) < lens.unsqueeze(1)).view(len(layout.decode_tables), 1, 1, -1)
        plans = {}
        for index, name in enumerate(SPACE_ORDER):
            if space_plans := self._plans(layout.seg_indptr, layout.seg_keys, index):
                plans[SPACES[name]] = space_plans
        hooked: dict[str, list[HookedAdapter]] = {}  # family -> its adapters in this step
        for adapter, rows in layout.hooked.items():
            entry = self.adapters.get(adapter)
            seqs = [SeqRows(t0, t1, pos, self._seq_state.setdefault(seq_id, {})) for seq_id, t0, t1, pos in layout.hooked_seqs[adapter]]
            hooked.setdefault(entry.family, []).append(HookedAdapter(entry, torch.tensor(rows, dtype=torch.long), seqs))
        hooks = [hook for family, adapters in hooked.items() for hook in FAMILIES[family].step_hooks(adapters)]
        return ForwardContext(
            slot_mapping=torch.tensor(layout.slots, dtype=torch.long),
            num_decode=len(layout.decode_tables),
            decode_block_tables=decode_tables,
            decode_mask=decode_mask,
            prefills=[PrefillChunk(t0, t1, ctx_len, torch.tensor(table, dtype=torch.long)) for t0, t1, ctx_len, table in layout.prefills],
            plans=plans,
            hooks=hooks,
        )

    @staticmethod
    def _plans(seg_indptr: list[int], seg_keys: list[tuple], space: int) -> dict:
        """Per module name, the space's segment plan over the adapters that target it: an adapter
        pays only for its own modules, and base or other-space segments carry no delta."""
        plans, built = {}, {}
        for module in ADAPTER_MODULES:
            rows = tuple(k[1] if k[0] == space and module in k[3] else -1 for k in seg_keys)
            if all(r < 0 for r in rows):
                continue
            ranks = tuple(k[2] if r >= 0 else 0 for k, r in zip(seg_keys, rows))
            if (rows, ranks) not in built:
                built[(rows, ranks)] = make_lora_plan(seg_indptr, rows, ranks)
            plans[module] = built[(rows, ranks)]
        return plans

    # -- forward and sample ----------------------------------------------------------------------
    def forward(self, layout: StepLayout, ctx: ForwardContext) -> torch.Tensor:
        return self.model(torch.tensor(layout.input_ids, dtype=torch.long), torch.tensor(layout.positions, dtype=torch.long), ctx)

    def sample(self, scheduled: list[ScheduledSeq], layout: StepLayout, hidden: torch.Tensor) -> StepResult:
        sampled: list[int | None] = [None] * len(scheduled)
        failures: dict[int, str] = {}
        if layout.sample_rows:
            last_hidden = hidden[torch.tensor([r for _, r in layout.sample_rows])]
            # finite hidden states give finite logits (base weights are finite, the state is normalised)
            finite = torch.isfinite(last_hidden).all(dim=-1).tolist()
            logits = self.model.compute_logits(last_hidden)
            seqs = [scheduled[i].seq for i, _ in layout.sample_rows]
            tokens, failed_rows = sample(logits, [s.params for s in seqs], [self._generator(s) for s in seqs], finite)
            for row, ((i, _), tok) in enumerate(zip(layout.sample_rows, tokens)):
                if row in failed_rows:
                    failures[i] = failed_rows[row]
                else:
                    sampled[i] = tok
        return StepResult(sampled, failures, layout.num_adapters)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None or seq.params.greedy:
            return None
        gen = self._generators.get(seq.seq_id)
        if gen is None:
            gen = self._generators[seq.seq_id] = torch.Generator().manual_seed(seq.params.seed)
        return gen
