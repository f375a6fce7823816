"""Decides which sequences run in the next step and how many tokens each. Never touches a tensor.

Policy (continuous batching with chunked prefill): every running sequence gets its next token
(or its next prompt chunk) first, then waiting sequences are admitted while the token budget,
the sequence limit and the KV-cache blocks allow (leaving one free block per running sequence), in
the order of the waiting queue (server.engine.fairness: first come first served, or fair across
tenants). A sequence admitted takes the blocks of its prompt's prefix that the prefix cache holds
(server.engine.block_manager) and computes only the rest. When blocks run out, a running sequence is
preempted — the newest, or under fair scheduling the newest of the tenant furthest ahead: its blocks
are freed and it is recomputed later.

Choices of one request (n > 1) share their prompt's computation: the first one (`prefill_parent` of the
others) is admitted alone; the others wait until its prompt is computed, then take its full prompt blocks
(reference-counted, as prefix-cache hits are) and compute only the prompt's last partial block.
A request that asks for prompt logprobs reads nothing from the prefix cache: it needs the logits of
every prompt position, so it computes them all (as vLLM's skip_reading_prefix_cache).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.engine.block_manager import BlockManager
from server.engine.fairness import FcfsQueue, WaitingQueue
from server.engine.sequence import RequestFailed, Sequence, SequenceStatus
from server.engine.speculative import Speculator


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens (drafts included)
    draft: list[int] = field(default_factory=list)  # draft tokens run after the sequence's own (speculative decoding)

    @property
    def samples(self) -> bool:
        """After this step every token is in the cache, so the next one is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens - len(self.draft) == self.seq.num_tokens


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        acquire_adapter: Callable[[Sequence], bool] = lambda seq: True,
        release_adapter: Callable[[Sequence], None] = lambda seq: None,
        speculator: Speculator | None = None,
        waiting: WaitingQueue | None = None,
        prefix_identity: Callable[[Sequence], str | None] = lambda seq: None,
    ):
        """acquire_adapter makes a sequence's adapter resident and counts the sequence as its user (False: not now;
        RequestFailed: never, and the sequence fails alone); release_adapter undoes the count when the
        sequence leaves the running batch. prefix_identity names what computes a sequence's KV for the
        prefix cache (None: it shares no blocks)."""
        self.blocks = block_manager
        self.speculator = speculator  # drafts tokens for decoding sequences (None: no speculative decoding)
        self.acquire_adapter, self.release_adapter = acquire_adapter, release_adapter
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting = waiting if waiting is not None else FcfsQueue()
        self.prefix_identity = prefix_identity
        self.running: list[Sequence] = []
        self.failed: list[Sequence] = []  # failed while being admitted, not yet reported (take_failed)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._leave(seq)
        seq.finish("abort")

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted below while making room for an earlier one
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n == 1 and self.speculator is not None:
                draft = self.speculator.propose(seq, len(self.running) + len(self.waiting), budget)
                # drafts only where blocks are to spare (one kept per running sequence): they never preempt anyone
                total = seq.num_computed_tokens + 1 + len(draft)
                spare = self.blocks.num_free - (self.blocks.blocks_needed(total) - len(seq.block_table))
                if draft and spare >= len(self.running) and self.blocks.ensure(seq, total):
                    scheduled.append(ScheduledSeq(seq, 1 + len(draft), draft))
                    budget -= 1 + len(draft)
                    continue
            while not self.blocks.ensure(seq, seq.num_computed_tokens + n):
                preempted = True
                # only sequences not yet scheduled in this step may give their blocks back
                victim = self.waiting.preemption_victim(self.running[self.running.index(seq):])
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self._charge_prompt(seq, n)
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n
        # Admitting while preempting would only thrash the cache.
        blocked: list[Sequence] = []  # by their adapter, or waiting for a sibling's prompt: the requests behind them pass
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting.peek()
            identity = self.prefix_identity(seq) if seq.num_computed_tokens == 0 and seq.params.prompt_logprobs is None else None
            hits = self.blocks.lookup(seq, identity) if identity is not None else []
            if identity is not None and seq.prefill_parent is not None:
                shared = self._sibling_blocks(seq)
                if shared is None:
                    blocked.append(self.waiting.pop())
                    continue
                if len(shared) > len(hits):
                    hits = shared
            start = len(hits) * self.blocks.block_size if hits else seq.num_computed_tokens
            n = min(seq.num_tokens - start, budget)
            # Keep one free block per running sequence so the admitted batch can grow without thrashing.
            needed = self.blocks.blocks_needed(start + n) - len(hits) - len(seq.block_table) + self.blocks.num_free_among(hits)
            if self.blocks.num_free - needed < len(self.running):
                break
            try:
                placed = self.acquire_adapter(seq)
            except RequestFailed as e:  # its adapter can never be placed: that request fails, not the step
                self.waiting.pop()
                seq.fail(e)
                self.failed.append(seq)
                continue
            if not placed:
                # its adapter cannot be placed until others go idle: let the requests behind it pass
                blocked.append(self.waiting.pop())
                continue
            seq.holds_adapter = True
            if identity is not None:
                self.blocks.take_cached(seq, hits, seq.num_tokens)
            self.blocks.ensure(seq, seq.num_computed_tokens + n)
            self.waiting.pop()
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            self._charge_prompt(seq, n)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        for seq in reversed(blocked):
            self.waiting.put_back(seq)
        return scheduled

    def _sibling_blocks(self, seq: Sequence) -> list[int] | None:
        """The blocks seq can take from its prefill parent: the parent's blocks that hold only prompt tokens
        and are computed ([] when there is nothing to share or the parent is gone); None while the parent's
        prompt is still to be computed (seq waits for it)."""
        parent, bs = seq.prefill_parent, self.blocks.block_size
        usable = (len(seq.prompt_token_ids) - 1) // bs  # at least one token is left to compute: its logits are sampled
        if usable == 0 or parent.is_finished:
            return []
        # waits for the parent's whole prompt (not only the blocks it shares): the parent's first output, which
        # carries its prompt logprobs for every choice (server.api.openai), then comes a step before the sibling's
        if parent.status is not SequenceStatus.RUNNING or parent.num_computed_tokens < len(parent.prompt_token_ids):
            return None
        return parent.block_table[:usable]

    def _charge_prompt(self, seq: Sequence, n: int) -> None:
        """Tokens computed other than by decoding (a prompt, or a preempted sequence's recomputed outputs)
        count as prompt service to seq's tenant; decoded tokens count as output in postprocess."""
        decoding = n == 1 and 0 < seq.num_computed_tokens == seq.num_tokens - 1
        if not decoding:
            self.waiting.charge(seq, n, 0)

    def _leave(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        if self.speculator is not None:
            self.speculator.forget(seq)
        if seq.holds_adapter:
            seq.holds_adapter = False
            self.release_adapter(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._leave(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.put_back(seq)

    def postprocess(self, scheduled: list[ScheduledSeq], sampled: list[list[int]], eos_token_ids: frozenset[int],
                    stops: Callable[[Sequence, int], bool] = lambda seq, token: False) -> list[int]:
        """Record computed tokens and sampled ones (several per sequence where drafts were accepted);
        finish sequences on EOS, stop tokens, `stops(seq, token)` (stop strings) or max_tokens: the
        tokens after the one that finishes a sequence are dropped. Returns how many tokens each
        sequence kept."""
        kept = []
        for item, tokens in zip(scheduled, sampled):
            seq = item.seq
            if item.draft:
                # the cache holds its own token and the accepted drafts: the rest are written over later
                accepted = max(0, len(tokens) - 1)
                seq.num_computed_tokens += 1 + accepted
                if self.speculator is not None:
                    self.speculator.record(seq, len(item.draft), accepted)
            else:
                seq.num_computed_tokens += item.num_new_tokens
            before = len(seq.output_token_ids)
            p = seq.params
            for token in tokens:
                seq.output_token_ids.append(token)
                if (token in eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
                    seq.finish("stop")
                elif stops(seq, token):
                    seq.finish("stop")
                elif len(seq.output_token_ids) >= p.max_tokens:
                    seq.finish("length")
                if seq.is_finished:
                    break
            kept.append(len(seq.output_token_ids) - before)
            self.waiting.charge(seq, 0, kept[-1])
            if self.blocks.completed_blocks(seq) and seq.finish_reason != "error":  # a failed step's KV may be garbage
                identity = self.prefix_identity(seq)
                if identity is not None:
                    self.blocks.cache_full_blocks(seq, identity)
        return kept

    def take_failed(self) -> list[Sequence]:
        failed, self.failed = self.failed, []
        return failed

    def release_finished(self) -> None:
        """Free the blocks of sequences finished by postprocess or by a stop string."""
        for seq in [s for s in self.running if s.is_finished]:
            self.running.remove(seq)
            self._leave(seq)
