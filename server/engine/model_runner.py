"""Turns scheduled sequences into tensors, runs the model and samples. The only engine part that touches tensors."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import make_lora_plan
from server.engine.sampler import sample
from server.engine.scheduler import ScheduledSeq
from server.engine.sequence import Sequence
from server.layers.context import ForwardContext, MoEGroup, PrefillChunk
from server.lora.manager import FAMILIES, SPACE_OF, AdapterManager
from server.models.llama import ADAPTER_MODULES, LlamaForCausalLM


@dataclass(slots=True)
class StepResult:
    tokens: list[int | None]  # per scheduled sequence: its sampled token; None while it is still prefilling or if it failed
    failures: dict[int, str]  # scheduled index -> why that sequence failed (its own numbers, its sampling)
    num_adapters: int  # distinct adapters in the step


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

    def _adapter_key(self, seq: Sequence) -> tuple:
        """(family index, first unit, units, target modules); (-1, -1, 0, ∅) for the base model."""
        if seq.adapter is None:
            return (-1, -1, 0, frozenset())
        entry = self.adapters.get(seq.adapter)
        if entry.family == "moe-lora":  # the step plan carries its attention LoRA; experts are routed per layer
            return (FAMILIES.index("lora"), entry.row_start, entry.weights.attn_rank, entry.targets)
        return (FAMILIES.index(SPACE_OF[entry.family]), entry.row_start, entry.rank, entry.targets)

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq]) -> StepResult:
        """The sampled token of every scheduled sequence, the sequences that failed alone, and the
        number of distinct adapters in the step."""
        keys = [self._adapter_key(s.seq) for s in scheduled]
        is_decode = [s.num_new_tokens == 1 and s.seq.num_computed_tokens > 0 for s in scheduled]
        # decode tokens first, then prefill chunks; each group sorted by adapter so adapters form segments
        order = sorted(range(len(scheduled)), key=lambda i: (not is_decode[i], keys[i]))
        bs = self.block_size

        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seg_indptr, seg_keys = [0], []
        dec_tables, dec_lens, prefills, sample_rows = [], [], [], []
        moe_tokens: dict[str, list[int]] = {}
        for i in order:
            item, seq = scheduled[i], scheduled[i].seq
            start, n = seq.num_computed_tokens, item.num_new_tokens
            t0 = len(input_ids)
            input_ids += seq.token_ids(start, start + n)
            positions += range(start, start + n)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            if is_decode[i]:
                dec_tables.append(table)
                dec_lens.append(start + 1)
            else:
                prefills.append(PrefillChunk(t0, t0 + n, start, torch.tensor(table, dtype=torch.long)))
            if item.samples:
                sample_rows.append((i, t0 + n - 1))
            if seq.adapter is not None and self.adapters.get(seq.adapter).family == "moe-lora":
                moe_tokens.setdefault(seq.adapter, []).extend(range(t0, t0 + n))
            if seg_keys and seg_keys[-1] == keys[i]:
                seg_indptr[-1] = t0 + n
            else:
                seg_indptr.append(t0 + n)
                seg_keys.append(keys[i])

        decode_tables = decode_mask = None
        if dec_tables:
            width = max(len(t) for t in dec_tables)
            decode_tables = torch.tensor([t + [self.null_block] * (width - len(t)) for t in dec_tables], dtype=torch.long)
            lens = torch.tensor(dec_lens)
            decode_mask = (torch.arange(width * bs).unsqueeze(0) < lens.unsqueeze(1)).view(len(dec_tables), 1, 1, -1)
        plans = [self._plans(seg_indptr, seg_keys, family) for family in range(len(FAMILIES))]
        ctx = ForwardContext(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            num_decode=len(dec_tables),
            decode_block_tables=decode_tables,
            decode_mask=decode_mask,
            prefills=prefills,
            lora_plans=plans[FAMILIES.index("lora")],
            s2ft_plans=plans[FAMILIES.index("s2ft")],
            moe=[self._moe_group(name, toks) for name, toks in moe_tokens.items()],
        )
        hidden = self.model(torch.tensor(input_ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long), ctx)

        sampled: list[int | None] = [None] * len(scheduled)
        failures: dict[int, str] = {}
        if sample_rows:
            last_hidden = hidden[torch.tensor([r for _, r in sample_rows])]
            # finite hidden states give finite logits (base weights are finite, the state is normalised)
            finite = torch.isfinite(last_hidden).all(dim=-1).tolist()
            logits = self.model.compute_logits(last_hidden)
            seqs = [scheduled[i].seq for i, _ in sample_rows]
            tokens, failed_rows = sample(logits, [s.params for s in seqs], [self._generator(s) for s in seqs], finite)
            for row, ((i, _), tok) in enumerate(zip(sample_rows, tokens)):
                if row in failed_rows:
                    failures[i] = failed_rows[row]
                else:
                    sampled[i] = tok
        return StepResult(sampled, failures, len({k for k in keys if k[0] >= 0}))

    def _moe_group(self, name: str, tokens: list[int]) -> MoEGroup:
        entry = self.adapters.get(name)
        w = entry.weights
        return MoEGroup(torch.tensor(tokens, dtype=torch.long), w, entry.row_start + w.attn_rank)

    @staticmethod
    def _plans(seg_indptr: list[int], seg_keys: list[tuple], family: int) -> dict:
        """Per module name, the family's segment plan over the adapters that target it: an adapter
        pays only for its own modules, and base or other-family segments carry no delta."""
        plans, built = {}, {}
        for module in ADAPTER_MODULES:
            rows = tuple(k[1] if k[0] == family and module in k[3] else -1 for k in seg_keys)
            if all(r < 0 for r in rows):
                continue
            ranks = tuple(k[2] if r >= 0 else 0 for k, r in zip(seg_keys, rows))
            if (rows, ranks) not in built:
                built[(rows, ranks)] = make_lora_plan(seg_indptr, rows, ranks)
            plans[module] = built[(rows, ranks)]
        return plans

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None or seq.params.greedy:
            return None
        gen = self._generators.get(seq.seq_id)
        if gen is None:
            gen = self._generators[seq.seq_id] = torch.Generator().manual_seed(seq.params.seed)
        return gen
