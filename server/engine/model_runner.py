"""Turns scheduled sequences into tensors, runs the model and samples. The only engine part that touches tensors.

One step is four stages (as in nano-vllm): `prepare` lays the scheduled tokens out in plain Python
lists, `plan` turns them into the forward context (KV slots, attention tables, each pool space's
per-module segment plans, the step hooks of families that route), `forward` runs the model and
`sample` picks the next tokens: logits, then the logits processors (penalties, logit_bias, min_tokens:
server.engine.logits_processors), then logprobs where asked (server.engine.logprobs), then sampling.

Every tensor lives on the engine's device. A step's index tensors (token ids, positions, KV slots,
block tables, segment plans, hook rows, sampled rows, blocks to clear) are laid out on the host and
moved in one copy (kernels.staging.HostStaging: pinned and non-blocking on CUDA); the one
device->host transfer of a step is the sampled tokens (`_to_host`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from kernels import make_lora_plan
from kernels.attention import PrefillChunks
from kernels.staging import HostStaging
from server.engine.guided import mask_logits
from server.engine.logits_processors import apply_processors
from server.engine.logprobs import SampledLogprobs, prompt_logprobs, to_host
from server.engine.sampler import NON_FINITE, sample, verify
from server.engine.scheduler import ScheduledSeq
from server.engine.sequence import SamplingParams, Sequence, TokenLogprob
from server.families.base import HookedAdapter, SeqRows
from server.families.registry import FAMILIES, SPACES
from server.layers.context import ForwardContext
from server.lora.manager import AdapterManager
from server.models.llama import LlamaForCausalLM
from server.models.modules import ADAPTER_MODULES

# Spaces in the order their adapters' tokens are grouped within a step (any fixed order works).
SPACE_ORDER = tuple(sorted(SPACES))
BASE_KEY = (-1, -1, 0, frozenset())  # the adapter key of a base-model sequence


@dataclass(slots=True)
class StepResult:
    tokens: list[list[int]]  # per scheduled sequence: its sampled tokens (accepted drafts, then the model's own); [] while it is still prefilling or if it failed
    failures: dict[int, str]  # scheduled index -> why that sequence failed (its own numbers, its sampling)
    num_adapters: int  # distinct adapters in the step
    logprobs: list[list[TokenLogprob]] = field(default_factory=list)  # per scheduled sequence, one per token of `tokens` (where its params ask)
    prompt_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)  # scheduled index -> its prompt tokens' logprobs computed this step


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
    sample_positions: list[int] = field(default_factory=list)  # ... and the position of the token each one samples
    sample_drafts: list[int] = field(default_factory=list)  # ... and the draft token put there (-1: none), for speculative decoding
    num_drafts: int = 0
    prompt_rows: list[tuple[int, int, int, int]] = field(default_factory=list)  # (scheduled index, first token row, first position, end position) whose next tokens' prompt logprobs are wanted
    hooked: dict[str, list[int]] = field(default_factory=dict)  # adapter -> its token rows, for families with a step hook
    hooked_seqs: dict[str, list[tuple[int, int, int, int]]] = field(default_factory=dict)  # ... and per sequence (seq id, first row, end row, first position)
    num_adapters: int = 0


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, adapters: AdapterManager, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu", eos_token_ids: frozenset[int] = frozenset()):
        self.model, self.adapters, self.block_size = model, adapters, block_size
        self.eos_token_ids = eos_token_ids  # masked, with each row's stop_token_ids, until its min_tokens
        self.device = torch.device(device)
        cfg = model.config
        # One block more than the block manager hands out: the null block, all zeros for ever, pads the
        # decode block tables. Attention masks padded and not-yet-written positions, but a mask only
        # zeroes their weight, and 0 x NaN is NaN: what sits in a position a sequence never wrote must
        # be finite, so fresh blocks are zeroed too (zero_blocks) before their first use.
        # One more, the scratch block, takes the keys of a CUDA graph's padding rows (server.engine.decode_graphs).
        self.null_block, self.scratch_block = num_blocks, num_blocks + 1
        shape = (num_blocks + 2, block_size, cfg.num_kv_heads, cfg.head_dim)
        for layer in model.layers:
            layer.attn.k_cache = torch.zeros(shape, dtype=model.dtype, device=self.device)
            layer.attn.v_cache = torch.zeros(shape, dtype=model.dtype, device=self.device)
        self.kv_cache_bytes = 2 * len(model.layers) * layer.attn.k_cache.nbytes
        self._fresh_blocks: list[int] = []  # handed to sequences, cleared by the next step before its forward
        self._seq_state: dict[int, dict] = {}  # seq id -> its adapter family's state across steps (SeqRows.state)
        # the decode fast path, set by the engine: DecodeGraphs on CUDA (replayed CUDA graphs), CompiledDecode on
        # the CPU (torch.compile); decode steps it fits run through it, the others eagerly
        self.graphs = None

    @staticmethod
    def space_index(name: str) -> int:
        """The index of a pool space in adapter keys (SPACE_ORDER)."""
        return SPACE_ORDER.index(name)

    def zero_blocks(self, blocks: list[int]) -> None:
        """Clear blocks just handed to sequences before the next forward reads them: a block's earlier
        owner may have left anything in it. (Done by the next step, with its index tensors.)"""
        self._fresh_blocks.extend(blocks)

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
        if self.graphs is not None and self.graphs.fits(layout, self._fresh_blocks):
            fresh, self._fresh_blocks = self._fresh_blocks, []
            try:
                hidden = self.graphs.run(layout, fresh)
            except BaseException:
                self._fresh_blocks[:0] = fresh
                raise
            n = len(layout.decode_tables)  # every decoding sequence samples, in row order
            return self.sample(scheduled, layout, {"sample_rows": torch.arange(n, device=self.device)}, hidden)
        ctx, step = self.plan(layout)
        hidden = self.forward(step, ctx)
        result = self.sample(scheduled, layout, step, hidden)
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
            out.input_ids += seq.token_ids(start, start + n - len(item.draft)) + item.draft
            out.positions += range(start, start + n)
            table = seq.block_table
            out.slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            if is_decode[i]:
                out.decode_tables.append(table)
                out.decode_lens.append(start + 1)
            else:
                out.prefills.append((t0, t0 + n, start, table))
            if item.draft:  # every row samples: its own token's next, then each draft's next
                k = len(item.draft)
                out.sample_rows += [(i, t0 + j) for j in range(k + 1)]
                out.sample_positions += range(start + 1, start + k + 2)
                out.sample_drafts += item.draft + [-1]
                out.num_drafts += k
            elif item.samples:
                out.sample_rows.append((i, t0 + n - 1))
                out.sample_positions.append(start + n)
                out.sample_drafts.append(-1)
            if seq.params.prompt_logprobs is not None and not is_decode[i]:
                # position p predicts prompt token p + 1; those recorded by an earlier (pre-preemption) run are kept
                first, end = max(start, len(seq.prompt_logprobs)), min(start + n, len(seq.prompt_token_ids) - 1)
                if first < end:
                    out.prompt_rows.append((i, t0 + first - start, first, end))
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
    def plan(self, layout: StepLayout) -> tuple[ForwardContext, dict[str, torch.Tensor]]:
        """The forward context and the step's own device tensors (input_ids, positions, sample_rows),
        every index tensor of both moved in one host->device copy."""
        staging = HostStaging(self.device)
        dev: dict[str, torch.Tensor] = {}

        def stage(key: str, values) -> None:
            staging.add(values, partial(dev.__setitem__, key))

        for key in ("input_ids", "positions", "slots"):
            stage(key, getattr(layout, key))
        stage("sample_rows", [row for _, row in layout.sample_rows])
        fresh, self._fresh_blocks = self._fresh_blocks, []
        try:
            stage("fresh_blocks", fresh)
            plans = self._stage_step(layout, staging, stage)
            staging.upload()
            self.zero_blocks_now(dev["fresh_blocks"])
        except BaseException:
            self._fresh_blocks[:0] = fresh  # not cleared: the next step (e.g. the one-at-a-time retry) clears them
            raise

        hooked: dict[str, list[HookedAdapter]] = {}  # family -> its adapters in this step
        for adapter in layout.hooked:
            entry = self.adapters.get(adapter)
            seqs = [SeqRows(t0, t1, pos, self._seq_state.setdefault(seq_id, {})) for seq_id, t0, t1, pos in layout.hooked_seqs[adapter]]
            hooked.setdefault(entry.family, []).append(HookedAdapter(entry, dev[f"hooked:{adapter}"], seqs))
        hooks = [hook for family, adapters in hooked.items() for hook in FAMILIES[family].step_hooks(adapters)]
        num_decode = len(layout.decode_tables)
        prefill = None
        if layout.prefills:
            first = layout.prefills[0][0]
            prefill = PrefillChunks(
                starts=[t0 - first for t0, *_ in layout.prefills], ends=[t1 - first for _, t1, *_ in layout.prefills],
                context_lens=[ctx_len for _, _, ctx_len, _ in layout.prefills], cu_q_lens=dev["prefill_cu_q"],
                context_lens_t=dev["prefill_ctx"], block_tables=dev["prefill_tables"].view(len(layout.prefills), -1),
                max_q_len=max(t1 - t0 for t0, t1, *_ in layout.prefills),
            )
        ctx = ForwardContext(
            slot_mapping=dev["slots"],
            num_decode=num_decode,
            decode_block_tables=dev["decode_tables"].view(num_decode, -1) if num_decode else None,
            decode_seq_lens=dev.get("decode_lens"),
            prefill=prefill,
            plans=plans,
            hooks=hooks,
        )
        return ctx, dev

    def _stage_step(self, layout: StepLayout, staging: HostStaging, stage) -> dict:
        """Stage the attention tables and the hooks' rows; build the plans (their index tensors are
        staged too and arrive with the upload)."""
        if layout.decode_tables:
            width = max(len(t) for t in layout.decode_tables)
            stage("decode_tables", [b for t in layout.decode_tables for b in t + [self.null_block] * (width - len(t))])
            stage("decode_lens", layout.decode_lens)
        if layout.prefills:
            width = max(len(t) for *_, t in layout.prefills)
            first = layout.prefills[0][0]  # prefill rows are counted from the first prefill token
            stage("prefill_tables", [b for *_, t in layout.prefills for b in t + [self.null_block] * (width - len(t))])
            stage("prefill_cu_q", [t0 - first for t0, *_ in layout.prefills] + [layout.prefills[-1][1] - first])
            stage("prefill_ctx", [ctx_len for _, _, ctx_len, _ in layout.prefills])
        for adapter, rows in layout.hooked.items():
            stage(f"hooked:{adapter}", rows)
        plans = {}
        for index, name in enumerate(SPACE_ORDER):
            if space_plans := self._plans(layout.seg_indptr, layout.seg_keys, index, staging):
                plans[SPACES[name]] = space_plans
        return plans

    def upload_into(self, static: torch.Tensor, host) -> None:
        """Copy a host int64 array into a device buffer of the same length in one (non-blocking) copy."""
        HostStaging.copy_into(static, host)

    def zero_blocks_now(self, blocks: torch.Tensor) -> None:
        """Clear these KV blocks (a device index tensor) before this step's forward writes or reads them."""
        if blocks.numel():
            for layer in self.model.layers:
                layer.attn.k_cache.index_fill_(0, blocks, 0)
                layer.attn.v_cache.index_fill_(0, blocks, 0)

    def _plans(self, seg_indptr: list[int], seg_keys: list[tuple], space: int, staging: HostStaging) -> dict:
        """Per module name, the space's segment plan over the adapters that target it: an adapter
        pays only for its own modules, and base or other-space segments carry no delta."""
        plans, built = {}, {}
        for module in ADAPTER_MODULES:
            rows = tuple(k[1] if k[0] == space and module in k[3] else -1 for k in seg_keys)
            if all(r < 0 for r in rows):
                continue
            ranks = tuple(k[2] if r >= 0 else 0 for k, r in zip(seg_keys, rows))
            if (rows, ranks) not in built:
                built[(rows, ranks)] = plan = make_lora_plan(seg_indptr, rows, ranks, self.device, staging)
                self.model.kernels.stage_plan(plan, staging)
            plans[module] = built[(rows, ranks)]
        return plans

    # -- forward and sample ----------------------------------------------------------------------
    def forward(self, step: dict[str, torch.Tensor], ctx: ForwardContext) -> torch.Tensor:
        return self.model(step["input_ids"], step["positions"], ctx)

    def sample(self, scheduled: list[ScheduledSeq], layout: StepLayout, step: dict[str, torch.Tensor], hidden: torch.Tensor) -> StepResult:
        sampled: list[list[int]] = [[] for _ in scheduled]
        sampled_logprobs: list[list[TokenLogprob]] = [[] for _ in scheduled]
        failures: dict[int, str] = {}
        if layout.sample_rows:
            last_hidden = hidden[step["sample_rows"]]
            # finite hidden states give finite logits (base weights are finite, the state is normalised)
            finite = torch.isfinite(last_hidden).all(dim=-1)
            logits = self.model.compute_logits(last_hidden)
            params = [scheduled[i].seq.params for i, _ in layout.sample_rows]
            logits = self._process(scheduled, layout, params, logits)
            asking = [j for j, p in enumerate(params) if p.logprobs is not None]
            wanted = SampledLogprobs(logits, asking, [params[j].logprobs for j in asking]) if asking else None
            # Hook: constraints that shape what may be sampled (grammar masks) apply here, to `logits`: after
            # the processors and after the logprobs were taken, so that logprobs do not depend on them.
            # Structured output (server.engine.guided): only guided rows pay for their masks.
            guided = [(r, scheduled[i].seq.guided) for r, (i, _) in enumerate(layout.sample_rows) if scheduled[i].seq.guided is not None]
            guided_failed = {layout.sample_rows[r][0]: why for r, why in mask_logits(logits, guided).items()} if guided else {}
            if not layout.num_drafts:
                tok_d = sample(logits, params, layout.sample_positions, finite)
                gathered = wanted.gather(tok_d) if wanted else None
                tokens = self._to_host(tok_d)
                accepted = [False] * len(tokens)
            else:
                tok_d, acc_d = verify(logits, params, layout.sample_positions, layout.sample_drafts, finite)
                gathered = wanted.gather(tok_d) if wanted else None
                tokens, accepted = self._verified(tok_d, acc_d)
            row_logprobs: dict[int, TokenLogprob] = {}
            if wanted:
                row_logprobs = dict(zip(asking, to_host([tokens[j] for j in asking], *gathered, wanted.top)))
            stopped: set[int] = set()  # sequences whose draft was rejected (or that failed): later rows are moot
            for j, ((i, _), tok, ok, draft) in enumerate(zip(layout.sample_rows, tokens, accepted, layout.sample_drafts)):
                if i in stopped:
                    continue
                if i in guided_failed:  # its matcher failed: this sequence alone fails
                    stopped.add(i)
                    failures[i] = guided_failed[i]
                    continue
                if ok:  # an accepted draft token, then the next row
                    sampled[i].append(draft)
                    if j in row_logprobs:
                        sampled_logprobs[i].append(row_logprobs[j])
                    continue
                stopped.add(i)
                if tok < 0:
                    failures[i] = NON_FINITE
                    sampled[i], sampled_logprobs[i] = [], []
                else:
                    sampled[i].append(tok)
                    if j in row_logprobs:
                        sampled_logprobs[i].append(row_logprobs[j])
        prompt = {}
        for i, row, first, end in layout.prompt_rows:
            seq = scheduled[i].seq
            rows = torch.arange(row, row + end - first, device=hidden.device)
            prompt[i] = prompt_logprobs(lambda r: self.model.compute_logits(hidden[r]), rows, seq.token_ids(first + 1, end + 1),
                                        seq.params.prompt_logprobs)  # fmt: skip
        return StepResult(sampled, failures, layout.num_adapters, sampled_logprobs, prompt)

    def _process(self, scheduled: list[ScheduledSeq], layout: StepLayout, params: list[SamplingParams], logits: torch.Tensor) -> torch.Tensor:
        """The logits processors over the sample rows (server.engine.logits_processors). A row's output so far
        is its sequence's output plus, in a speculative verify row, the draft tokens before it."""
        if not any(p.processes_logits for p in params):
            return logits
        prompts: list[list[int]] = []
        outputs: list[list[int]] = []
        for (i, _), pos, p in zip(layout.sample_rows, layout.sample_positions, params):
            item = scheduled[i]
            if not p.processes_logits:
                prompts.append([])
                outputs.append([])
                continue
            prompts.append(item.seq.prompt_token_ids)
            outputs.append(item.seq.output_token_ids + item.draft[: pos - item.seq.num_tokens])
        return apply_processors(logits, params, prompts, outputs, self.eos_token_ids)

    def _verified(self, tokens: torch.Tensor, accepted: torch.Tensor) -> tuple[list[int], list[bool]]:
        """Tokens and acceptances in the step's one device->host transfer."""
        both = self._to_host(torch.stack([tokens, accepted.long()]))
        return both[0], [bool(a) for a in both[1]]

    @staticmethod
    def _to_host(tokens: torch.Tensor) -> list[int]:
        """The step's one device->host transfer (it waits for the step's kernels to finish)."""
        return tokens.tolist()
