"""Logprobs of sampled tokens and of prompt tokens, for the rows that ask for them.

Convention (docs/api.md, "Logprobs"): a sampled token's logprobs are the float32 log-softmax of the
logits the row samples from after the logits processors (penalties, logit_bias, min_tokens:
server.engine.logits_processors) and before temperature, top-k and top-p (and before a grammar's
mask). vLLM v1's default (`--logprobs-mode raw_logprobs`) takes them before its processors too, so the
two agree exactly on every request without penalties, bias or min_tokens. Prompt logprobs are always
the model's own (raw) distribution: no processor applies to a prompt position, as in vLLM.

Shapes: R rows ask for logprobs; k is the most alternatives any of them asks for, each row keeps its own.
"""
from __future__ import annotations

import torch
from torch import Tensor

from server.engine.sequence import TokenLogprob

# Prompt positions turned into logprobs at once: a (rows, V) float32 block each (49152 x 256 x 4 = 48 MiB).
PROMPT_CHUNK = 256


class SampledLogprobs:
    """Holds the log-softmax of the rows that ask for logprobs, taken before sampling (a grammar mask
    applied in place to the logits afterwards does not reach it), until the sampled tokens are known."""

    def __init__(self, logits: Tensor, rows: list[int], top: list[int]):
        """logits (B, V) float32, processed; rows: the rows that ask (ascending); top[j]: row rows[j]'s k."""
        self.rows, self.top = rows, top
        self._index = torch.tensor(rows, dtype=torch.int64).to(logits.device, non_blocking=True)
        self._logprobs = logits.index_select(0, self._index).log_softmax(dim=-1)  # (R, V)

    def gather(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """tokens (B,) int64, the batch's sampled tokens on the device (-1: none) -> (the rows' token
        logprob (R,), top ids (R, k), top logprobs (R, k)): device tensors for `to_host`."""
        chosen = tokens.index_select(0, self._index).clamp(min=0).unsqueeze(1)  # (R, 1)
        token_lp = self._logprobs.gather(1, chosen).squeeze(1)
        k = max(self.top)
        top_lp, top_ids = self._logprobs.topk(k, dim=-1) if k else (self._logprobs[:, :0], chosen[:, :0])
        return token_lp, top_ids, top_lp


def to_host(token_ids: list[int], token_lp: Tensor, top_ids: Tensor, top_lp: Tensor, top: list[int]) -> list[TokenLogprob]:
    """One TokenLogprob per row, from the device tensors of `SampledLogprobs.gather` or `prompt_logprobs`."""
    lps, ids, vals = token_lp.tolist(), top_ids.tolist(), top_lp.tolist()
    return [TokenLogprob(t, lp, tuple(zip(i[:k], v[:k]))) for t, lp, i, v, k in zip(token_ids, lps, ids, vals, top)]


def prompt_logprobs(logits_of, rows: Tensor, next_tokens: list[int], k: int) -> list[TokenLogprob]:
    """The raw logprobs of prompt tokens: row j of `rows` (hidden-state rows, on the device) predicts
    next_tokens[j]. `logits_of(rows) -> (n, V) float32` runs the model's head; done PROMPT_CHUNK rows at a time."""
    out: list[TokenLogprob] = []
    for s in range(0, len(next_tokens), PROMPT_CHUNK):
        lp = logits_of(rows[s : s + PROMPT_CHUNK]).log_softmax(dim=-1)  # (n, V)
        want = next_tokens[s : s + PROMPT_CHUNK]
        token_lp = lp.gather(1, torch.tensor(want, dtype=torch.int64).to(lp.device).unsqueeze(1)).squeeze(1)
        top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        out += to_host(want, token_lp, top_ids, top_lp, [k] * len(want))
    return out
