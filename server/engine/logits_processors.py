"""Logits processors: min_tokens, logit_bias and the three penalties, a whole batch at once (vLLM v1's semantics).

Semantics, per row, in vLLM v1's order (its non-argmax-invariant processors, then its penalties):

    x[stop]  = -inf                        while len(output) < min_tokens; stop = EOS ids | stop_token_ids
    x[t]    += logit_bias[t]
    x[t]     = x[t] / r if x[t] > 0 else x[t] * r      for t in prompt | output   (repetition_penalty r)
    x[t]    -= frequency_penalty * count_output(t) + presence_penalty * [count_output(t) > 0]

`output` is what the row's sequence generated before the token the row samples (in a speculative verify
row: the accepted output plus the draft tokens before that row). Repetition divides as vLLM's torch
version does, multiplying by the float32 reciprocal: the same numbers.

Rows whose parameters change nothing cost nothing; the token counts (output) and presence masks (prompt)
are built on the device by one scatter-add over the penalised rows' tokens, uploaded in one copy.
`apply_processors_reference` is the same, one row at a time in plain steps: the test oracle.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels.staging import HostStaging
from server.engine.sequence import SamplingParams

_NEG_INF = float("-inf")


def apply_processors(logits: Tensor, params: list[SamplingParams], prompts: list[list[int]], outputs: list[list[int]],
                     eos_token_ids: frozenset[int]) -> Tensor:
    """logits (B, V) float32 -> the processed logits (B, V), in place. `prompts[i]` / `outputs[i]`: row i's
    prompt and output tokens so far (only read for rows that use them: others may pass [])."""
    rows = [i for i, p in enumerate(params) if p.processes_logits]
    if not rows:
        return logits
    B, V = logits.shape
    staging = HostStaging(logits.device)
    dev: dict[str, Tensor] = {}

    def stage(key: str, values) -> None:
        staging.add(values, lambda t: dev.__setitem__(key, t))

    # sparse edits: (row, token) to mask, (row, token) += bias; token ids past the vocabulary are dropped
    mask_at: list[int] = []
    bias_at: list[int] = []
    bias_values: list[float] = []
    for i in rows:
        p = params[i]
        if len(outputs[i]) < p.min_tokens:
            mask_at += [i * V + t for t in sorted(eos_token_ids.union(p.stop_token_ids)) if t < V]
        for t, b in p.logit_bias:
            if t < V:
                bias_at.append(i * V + t)
                bias_values.append(b)
    stage("mask_at", mask_at)
    stage("bias_at", bias_at)

    # penalised rows: their output tokens (counts) and, with a repetition penalty, their prompt tokens (presence)
    pen = [i for i in rows if params[i].penalized]
    rep = [i for i in pen if params[i].repetition_penalty != 1.0]
    if pen:
        stage("pen_rows", pen)
        stage("out_tokens", [t for i in pen for t in outputs[i]])
        stage("out_lens", [len(outputs[i]) for i in pen])
        if rep:
            stage("prompt_tokens", [t for i in rep for t in prompts[i]])
            stage("prompt_lens", [len(prompts[i]) if params[i].repetition_penalty != 1.0 else 0 for i in pen])
    staging.upload()
    floats = torch.tensor(bias_values + [params[i].repetition_penalty for i in pen] + [params[i].frequency_penalty for i in pen]
                          + [params[i].presence_penalty for i in pen], dtype=torch.float32).to(logits.device, non_blocking=True)  # fmt: skip

    flat = logits.view(-1)
    if mask_at:
        flat.index_fill_(0, dev["mask_at"], _NEG_INF)
    if bias_at:
        flat.index_add_(0, dev["bias_at"], floats[: len(bias_at)])
    if not pen:
        return logits
    R, n = len(pen), len(bias_at)
    r_pen, f_pen, p_pen = (floats[n + k * R : n + (k + 1) * R].unsqueeze(1) for k in range(3))  # (R, 1) each
    x = logits.index_select(0, dev["pen_rows"])  # (R, V)
    counts = _bin_counts(dev["out_tokens"], dev["out_lens"], R, V)  # (R, V) float32
    seen = counts > 0
    if rep:
        in_prompt = _bin_counts(dev["prompt_tokens"], dev["prompt_lens"], R, V) > 0
        penalty = torch.where(in_prompt | seen, r_pen, 1.0)  # (R, V)
        x = x * torch.where(x > 0, 1.0 / penalty, penalty)
    x = x - f_pen * counts - p_pen * seen
    logits.index_copy_(0, dev["pen_rows"], x)
    return logits


def _bin_counts(tokens: Tensor, lengths: Tensor, rows: int, vocab_size: int) -> Tensor:
    """tokens (N,) int64, the rows' token lists back to back, lengths (rows,) -> (rows, V) float32 counts
    (exact below 2**24)."""
    counts = torch.zeros(rows * vocab_size, dtype=torch.float32, device=tokens.device)
    if tokens.numel():
        row = torch.repeat_interleave(torch.arange(rows, device=tokens.device), lengths, output_size=tokens.numel())
        counts.index_add_(0, row * vocab_size + tokens, torch.ones_like(tokens, dtype=torch.float32))
    return counts.view(rows, vocab_size)


def apply_processors_reference(logits: Tensor, params: list[SamplingParams], prompts: list[list[int]], outputs: list[list[int]],
                               eos_token_ids: frozenset[int]) -> Tensor:
    """`apply_processors`, one row at a time in plain steps (the test oracle); returns a new tensor."""
    out = logits.clone()
    V = logits.shape[-1]
    for i, p in enumerate(params):
        x = out[i]
        if len(outputs[i]) < p.min_tokens:
            for t in eos_token_ids | set(p.stop_token_ids):
                if t < V:
                    x[t] = _NEG_INF
        for t, b in p.logit_bias:
            if t < V:
                x[t] += torch.tensor(b, dtype=torch.float32)
        r = torch.tensor(p.repetition_penalty, dtype=torch.float32)
        if p.repetition_penalty != 1.0:
            for t in set(prompts[i]) | set(outputs[i]):
                x[t] = x[t] * (1.0 / r) if x[t] > 0 else x[t] * r
        if p.frequency_penalty or p.presence_penalty:
            counts: dict[int, int] = {}
            for t in outputs[i]:
                counts[t] = counts.get(t, 0) + 1
            for t, c in counts.items():
                x[t] = x[t] - torch.tensor(p.frequency_penalty, dtype=torch.float32) * c - torch.tensor(p.presence_penalty, dtype=torch.float32)
    return out
