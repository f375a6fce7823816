"""Speculative decoding by prompt lookup (n-gram drafts): what to draft, for whom. Never touches a tensor.

A sequence that decodes may run 1 + k tokens in a step instead of 1: its last sampled token and k
draft tokens guessed by looking the sequence's own last n tokens up earlier in its prompt and output
(the tokens that followed that earlier occurrence are the guess). The step verifies the whole draft
in one forward pass, with the request's own adapter, and the sampler keeps the longest prefix the
model agrees with plus one token of its own (server.engine.sampler.verify): exactly the greedy tokens
for greedy requests, the same distribution for sampled ones. Drafting costs no model.

It pays where a step is bound by reading the weights rather than by arithmetic: one or a few
sequences, whose step costs about the same for 1 or 1 + k tokens. So a step drafts only while at most
`disable_by_batch_size` sequences run or wait (vLLM's option of the same name), and a sequence whose drafts
keep being rejected stops drafting for a while.

The options are vLLM's `--speculative-config` JSON for its n-gram method:
    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1,
     "disable_by_batch_size": 4}
"""
from __future__ import annotations

import json
from array import array
from dataclasses import dataclass, fields

from server.engine.sequence import Sequence

_ITEM = array("q").itemsize


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 2  # k: draft tokens per step at most (see the module docstring for why 2 on CPU)
    prompt_lookup_max: int = 4  # the longest suffix n-gram looked up ...
    prompt_lookup_min: int = 1  # ... down to the shortest
    disable_by_batch_size: int = 4  # no drafts in steps where more sequences than this are running

    def __post_init__(self) -> None:
        if self.method != "ngram":
            raise ValueError(f"speculative method {self.method!r}: only 'ngram' (prompt lookup) is served")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError("num_speculative_tokens must lie in 1..16")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max <= 16:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max <= 16")
        if self.disable_by_batch_size < 1:
            raise ValueError("disable_by_batch_size must be at least 1")

    @classmethod
    def from_json(cls, text: str) -> "SpeculativeConfig":
        """vLLM's --speculative-config JSON (keys it has that do not apply to n-gram drafts are refused)."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e.msg}") from None
        if not isinstance(raw, dict):
            raise ValueError("must be a JSON object")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(raw) - known):
            raise ValueError(f"unknown keys {unknown}; known: {sorted(known)}")
        for key, value in raw.items():
            if key != "method" and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{key} must be an integer")
        return cls(**raw)


def propose_ngram(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix n-gram of
    `tokens` (n from n_max down to n_min); [] if no suffix of those lengths occurred before.

    The search runs in C: the tokens as int64 bytes and bytes.rfind, keeping only matches that start
    on a token boundary."""
    L = len(tokens)
    if L < n_min + 1 or k < 1:
        return []
    raw = array("q", tokens).tobytes()
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        pattern = raw[(L - n) * _ITEM:]
        end = (L - 1) * _ITEM  # the occurrence must end before the last token: it is not its own match
        while (at := raw.rfind(pattern, 0, end)) >= 0:
            if at % _ITEM == 0:
                start = at // _ITEM + n
                return tokens[start:start + k]
            end = at + len(pattern) - 1
    return []


def propose_ngram_reference(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """`propose_ngram` as a plain loop over positions (the test oracle)."""
    L = len(tokens)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = tokens[L - n:]
        for i in range(L - n - 1, -1, -1):
            if tokens[i:i + n] == suffix:
                return tokens[i + n:i + n + k]
    return []


@dataclass(slots=True)
class _Record:
    drafted: int = 0
    accepted: int = 0
    cooldown: int = 0  # steps left without drafts


class Speculator:
    """Drafts for the scheduler, and how well each sequence's drafts have done.

    A sequence that has had at least `PROBE` draft tokens checked and kept under `MIN_ACCEPTANCE` of
    them drafts nothing for the next `COOLDOWN` steps (its text stopped repeating itself): a rejected
    draft costs its forward pass work for nothing."""

    PROBE, MIN_ACCEPTANCE, COOLDOWN = 8, 0.25, 16

    def __init__(self, config: SpeculativeConfig, allowed=lambda seq: True):
        self.config = config
        self.allowed = allowed  # seq -> whether its adapter can be verified several tokens at a time
        self._records: dict[int, _Record] = {}
        self.drafted = self.accepted = 0  # totals, for metrics

    def propose(self, seq: Sequence, running: int, budget: int) -> list[int]:
        """Draft tokens for a decoding sequence while `running` sequences run or wait, with `budget`
        tokens of the step left for it (its own token included)."""
        cfg = self.config
        if running > cfg.disable_by_batch_size or budget < 2:
            return []
        rec = self._records.get(seq.seq_id)
        if rec is not None and rec.cooldown:
            rec.cooldown -= 1
            return []
        # a draft never runs past max_tokens: the last token of a request is always the model's own
        k = min(cfg.num_speculative_tokens, budget - 1, seq.params.max_tokens - len(seq.output_token_ids) - 1)
        if k < 1 or not self.allowed(seq):
            return []
        return propose_ngram(seq.token_ids(0, seq.num_tokens), k, cfg.prompt_lookup_max, cfg.prompt_lookup_min)

    def record(self, seq: Sequence, drafted: int, accepted: int) -> None:
        """A step checked `drafted` draft tokens of this sequence and kept `accepted` of them."""
        self.drafted += drafted
        self.accepted += accepted
        rec = self._records.setdefault(seq.seq_id, _Record())
        rec.drafted += drafted
        rec.accepted += accepted
        if rec.drafted >= self.PROBE:
            if rec.accepted < self.MIN_ACCEPTANCE * rec.drafted:
                rec.cooldown = self.COOLDOWN
            rec.drafted = rec.accepted = 0

    def forget(self, seq: Sequence) -> None:
        self._records.pop(seq.seq_id, None)
