"""Next-token sampling: greedy, temperature, top-k, top-p, per-request seeds.

A row that cannot be sampled (its logits are not finite, say from an adapter whose numbers blew up)
fails alone: the other rows of the batch get their tokens as if it were not there.
"""
from __future__ import annotations

import logging

import torch

from server.engine.sequence import SamplingParams

log = logging.getLogger(__name__)

NON_FINITE = "the model's output for this request was not finite (NaN or infinity): its adapter's numbers overflow"
SAMPLING_FAILED = "sampling the next token failed for this request"


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None], finite: list[bool] | None = None,
) -> tuple[list[int], dict[int, str]]:
    """logits: (B, V) float32 -> (one token id per row, {row: why it failed} for rows that failed).

    `finite` says which rows are finite when the caller knows it more cheaply than from the (B, V)
    logits (the model runner checks the (B, hidden) states they come from: ~100x fewer numbers)."""
    tokens = logits.argmax(dim=-1).tolist()
    if finite is None:
        finite = torch.isfinite(logits.sum(dim=-1)).tolist()  # NaN or ±inf anywhere in a row makes its sum so
    failed = {i: NON_FINITE for i, ok in enumerate(finite) if not ok}
    for i, p in enumerate(params):
        if p.greedy or i in failed:
            continue
        try:
            tokens[i] = _sample_row(logits[i], p, generators[i])
        except RuntimeError:  # torch's errors are RuntimeErrors; none may fail the other rows
            log.exception("sampling failed for one row")
            failed[i] = SAMPLING_FAILED
    return tokens, failed


def _sample_row(row: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    row = row / p.temperature
    if 0 < p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = row.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p; the top token always stays,
        # even when top_p is below float32's smallest number
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        drop[0] = False
        row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = row.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
