"""Next-token sampling: greedy, temperature, top-k, top-p, per-request seeds, a whole batch at once.

Semantics, per row: greedy rows take argmax(logits); the others sample from

    probs = softmax(mask(logits / temperature)),   token = argmax(probs / q),   q ~ Exp(1) per token

(the "exponential race": the index of the smallest of independent Exp(probs[v]) clocks, q[v] / probs[v],
is distributed as probs, so this is multinomial sampling without a cumulative sum or a search).
`mask` keeps the top-k tokens (top_k <= 0 or >= V: off) and then, of those, the top-p nucleus: sorted
by probability, a token is dropped once the mass before it already reaches top_p; the top token always
stays. Tokens tied with the last kept one are kept too (for top-k as for top-p), so the result never
depends on how a sort orders ties.

A row that cannot be sampled (its logits are not finite, say from an adapter whose numbers blew up)
gets -1 alone: every op is row-wise, so the other rows get their tokens as if it were not there.

The whole batch is sampled with tensor ops on the logits' device, without a host sync: the caller
does the step's one device->host copy of the tokens. Per-row parameters travel in one small
host->device copy.

Seeded rows draw their noise from a counter-based hash of (seed, position of the token, vocab index)
(splitmix64 of (seed, position) on the host, a 32-bit integer mix of (that key, vocab index) on the
device) rather than from a per-request torch.Generator: a Generator is sequential state, one per request,
so rows with different seeds cannot be drawn in one batched op, and its stream differs between
devices (mt19937 on CPU, Philox offsets on CUDA). A hash keyed by (seed, position) is what counter-
based generators such as Philox do: the noise of a token depends on nothing but its key, so the same
seed and position give the same bits on any device, whatever else is in the batch, and a preempted
sequence that is recomputed samples the same tokens again. Unseeded rows use the device's default
generator.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from server.engine.sequence import SamplingParams

NON_FINITE = "the model's output for this request was not finite (NaN or infinity): its adapter's numbers overflow"

_M32, _M64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF
_NEG_INF = float("-inf")


def sample(logits: Tensor, params: list[SamplingParams], positions: list[int], finite: Tensor | None = None) -> Tensor:
    """logits (B, V) float32 on the device -> (B,) int64 on the same device: each row's token, or -1
    where the row cannot be sampled (its logits or `finite[row]` not finite).

    `positions[i]`: the position in its sequence of the token row i samples (keys seeded noise).
    `finite`: (B,) bool on the device, when the caller knows it more cheaply than from the (B, V)
    logits (the model runner checks the (B, hidden) states they come from: ~100x fewer numbers)."""
    return _sample(logits, params, positions, finite, None)[0]


def verify(logits: Tensor, params: list[SamplingParams], positions: list[int], drafts: list[int],
           finite: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Speculative decoding's check of draft tokens: row i holds the distribution of the token at
    positions[i] and drafts[i] the token a draft put there (-1: none). Returns (tokens, accepted),
    both (B,) on the device: accepted rows keep their draft as token; the others hold a token of their own.

    Greedy rows accept a draft equal to their argmax, else give the argmax. Sampled rows accept with
    probability p(draft) under their masked distribution p, and otherwise sample from p without the
    draft token, renormalised: the token a row gives is then distributed as p exactly (a draft is a
    point mass q = 1 at its token, and this is the rejection rule of speculative sampling,
    min(1, p/q) then the residual max(p - q, 0), for that q). A row that cannot be sampled gets -1 and
    accepts nothing."""
    return _sample(logits, params, positions, finite, drafts)


def _sample(logits: Tensor, params: list[SamplingParams], positions: list[int], finite: Tensor | None,
            drafts: list[int] | None) -> tuple[Tensor, Tensor | None]:
    B, V = logits.shape
    assert len(params) == B and len(positions) == B, "one SamplingParams and one position per row"
    assert drafts is None or len(drafts) == B, "one draft token (or -1) per row"
    device = logits.device
    if finite is None:
        finite = torch.isfinite(logits).all(dim=-1)  # (B,)
    rows = [i for i, p in enumerate(params) if not p.greedy]  # host data: cheap Python checks
    draft_d = None
    if drafts is not None:
        draft_d = torch.tensor(drafts, dtype=torch.int64)
        draft_d = (draft_d.pin_memory() if device.type == "cuda" else draft_d).to(device, non_blocking=True)
    if not rows:
        tokens = torch.where(finite, logits.argmax(dim=-1), -1)
        return tokens, None if draft_d is None else (tokens == draft_d) & (draft_d >= 0)

    # One host->device copy of the sampling rows' parameters, as float64 (exact for every column:
    # 32-bit key halves, k <= V, and the float32 the temperature and top_p become on the device).
    # Row j of the table: [batch row, temperature, top_p, top_k, seeded rows' j, key low, key high,
    # acceptance key low, acceptance key high]; the last five columns list the seeded rows, from the top.
    seeded = [j for j, i in enumerate(rows) if params[i].seed is not None]
    table = [[i, params[i].temperature, _top_p(params[i]), _top_k(params[i], V), 0.0, 0.0, 0.0, 0.0, 0.0] for i in rows]
    for slot, j in enumerate(seeded):
        i = rows[j]
        table[slot][4:] = [j, *_row_key(params[i].seed, positions[i]), *_accept_key(params[i].seed, positions[i])]
    host = torch.tensor(table, dtype=torch.float64)  # (S, 9)
    if device.type == "cuda":
        host = host.pin_memory()
    table_d = host.to(device, non_blocking=True)
    S = len(rows)
    row_idx = table_d[:, 0].long()

    x = logits if S == B else logits.index_select(0, row_idx)  # (S, V)
    if any(params[i].temperature != 1.0 for i in rows):
        x = x / table_d[:, 1:2].float()
    x = _mask(x, [params[i] for i in rows], table_d[:, 3].long(), table_d[:, 2].float())
    probs = x.softmax(dim=-1)  # (S, V)

    accepted_s = None
    if draft_d is not None:
        d = draft_d if S == B else draft_d.index_select(0, row_idx)  # (S,)
        has = (d >= 0).unsqueeze(1)
        at = d.clamp(min=0).unsqueeze(1)
        p_draft = torch.where(has, probs.gather(1, at), 0.0).squeeze(1)  # (S,)
        if len(seeded) == S:
            u = seeded_uniform(table_d[:, 7:9].long())
        else:
            u = torch.rand(S, device=device)
            if seeded:
                n = len(seeded)
                u.index_copy_(0, table_d[:n, 4].long(), seeded_uniform(table_d[:n, 7:9].long()))
        accepted_s = u < p_draft  # never for a row without a draft (p_draft 0)
        probs = probs.scatter(1, at, torch.where(has, 0.0, probs.gather(1, at)))  # the residual: p without the draft

    if len(seeded) == S:
        q = seeded_noise(table_d[:, 5:7].long(), V)
    else:
        q = exp_noise(S, V, device)
        if seeded:
            n = len(seeded)
            q.index_copy_(0, table_d[:n, 4].long(), seeded_noise(table_d[:n, 5:7].long(), V))
    best, sampled = (probs / q).max(dim=-1)  # (S,): the race
    # best > 0 always holds for a finite row (its top token has probability >= 1/V, q is finite for it);
    # it fails (NaN) for a row whose logits / temperature overflowed
    sampled = torch.where(best > 0, sampled, -1)
    if accepted_s is not None:  # (a residual can be empty, best 0: only when p(draft) = 1, always accepted)
        sampled = torch.where(accepted_s, d, sampled)

    if S == B:
        tokens = sampled
    else:
        tokens = logits.argmax(dim=-1)  # (B,): the greedy rows' tokens
        tokens.index_copy_(0, row_idx, sampled)
    tokens = torch.where(finite, tokens, -1)
    if draft_d is None:
        return tokens, None
    if S == B:
        accepted = accepted_s
    else:
        accepted = (tokens == draft_d) & (draft_d >= 0)  # the greedy rows'
        accepted.index_copy_(0, row_idx, accepted_s)
    return tokens, accepted & finite


def _top_p(p: SamplingParams) -> float:
    return p.top_p if p.top_p < 1.0 else float("inf")  # inf: off (a float32 cumsum can reach 1.0 early)


def _top_k(p: SamplingParams, vocab_size: int) -> int:
    return p.top_k if 0 < p.top_k < vocab_size else 0  # 0: off


def _mask(x: Tensor, params: list[SamplingParams], top_k: Tensor, top_p: Tensor) -> Tensor:
    """x (S, V) -> x with -inf outside each row's top-k, then top-p set. `top_k` (S,) int64 and
    `top_p` (S,) float32 hold `params` as `_top_k` and `_top_p` encode them, on x's device.
    The cheapest op that serves the batch: nothing, a top-k, or one full sort."""
    V = x.shape[-1]
    if any(p.top_p < 1.0 for p in params):
        return _mask_top_k_top_p(x, top_k, top_p)
    if max_k := max(_top_k(p, V) for p in params):
        return _mask_top_k(x, top_k, max_k)
    return x


def _mask_top_k(x: Tensor, top_k: Tensor, max_k: int) -> Tensor:
    """x (S, V), top_k (S,) int64 (0 = off) -> x with -inf below each row's k-th largest value."""
    top = torch.topk(x, max_k, dim=-1).values  # (S, max_k), descending
    kth = top.gather(1, (top_k.clamp(min=1) - 1).unsqueeze(1))  # (S, 1)
    kth = torch.where(top_k.unsqueeze(1) > 0, kth, _NEG_INF)
    return x.masked_fill(x < kth, _NEG_INF)


def _mask_top_k_top_p(x: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """x (S, V), top_k (S,) int64 (0 = off), top_p (S,) float32 (inf = off) -> x with -inf outside
    each row's top-k and then top-p set. One sort serves both."""
    S, V = x.shape
    ordered = _sort_descending(x)  # (S, V)
    kth = ordered.gather(1, torch.where(top_k > 0, top_k, V).sub(1).unsqueeze(1))  # (S, 1)
    probs = ordered.masked_fill(ordered < kth, _NEG_INF).softmax(dim=-1)  # (S, V), sorted, after top-k
    keep = (probs.cumsum(dim=-1) - probs) < top_p.unsqueeze(1)  # the mass before a token is below top_p
    keep[:, 0] = True  # the top token stays even when top_p is below float32's smallest number
    # the kept tokens are a prefix of the sorted row: the last one's value is the threshold
    last = ordered.gather(1, keep.sum(dim=-1, keepdim=True) - 1)  # (S, 1)
    return x.masked_fill(x < torch.maximum(kth, last), _NEG_INF)


def _sort_descending(x: Tensor) -> Tensor:
    """Each row's values, largest first. On CPU through numpy, whose SIMD sort is ~20x faster than
    torch's there (3 ms -> 0.15 ms a 49152-token row); a values-only sort gives the same numbers
    whatever the algorithm."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sort(x.detach().numpy(), axis=-1)).flip(-1)
    return x.sort(dim=-1, descending=True).values


# -- seeded noise: a counter-based hash of (seed, position, vocab index) -------------------------------


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _row_key(seed: int, position: int) -> tuple[int, int]:
    """The 64-bit key of (seed, position), as two 32-bit halves. Seeds span SEED_RANGE
    (-(2**63) .. 2**64 - 1): folded to 64 bits, as torch.Generator.manual_seed does."""
    key = _splitmix64(_splitmix64(seed & _M64) ^ (position & _M64))
    return key & _M32, key >> 32


def _accept_key(seed: int, position: int) -> tuple[int, int]:
    """The key of the uniform number that accepts or rejects a draft token at (seed, position): not the
    race's key, so acceptance and the residual's token are independent."""
    return _row_key(seed ^ 0x5851F42D4C957F2D, position)


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit avalanche mix (hash-prospector's lowbias32 with its improved constants), in place on
    int64 holding values in [0, 2**32): both multipliers are below 2**31, so no product overflows
    int64 and every right shift sees a non-negative number."""
    x ^= x >> 16
    x.mul_(0x21F0AAAD).bitwise_and_(_M32)
    x ^= x >> 15
    x.mul_(0x735A2D97).bitwise_and_(_M32)
    x ^= x >> 15
    return x


@functools.lru_cache(maxsize=8)
def _vocab_hashes(vocab_size: int, device: torch.device) -> Tensor:
    """(V,) int64: each vocab index mixed once, the per-token counter of the hash."""
    return _mix32(torch.arange(vocab_size, dtype=torch.int64, device=device).mul_(0x9E3779B1).bitwise_and_(_M32))


def seeded_noise(keys: Tensor, vocab_size: int) -> Tensor:
    """keys (R, 2) int64, each row's (low, high) 32-bit key halves (from `_row_key`) -> q (R, V)
    float32, Exp(1) noise: q = -log(u), u uniform in (0, 1) from 23 hash bits. Integer ops are exact,
    so the bits are the same on every device."""
    # the vocab index's own mix, keyed by both halves, mixed again: two rounds of mixing per token,
    # one of them shared by every row (the (R, V) int64 ops are the seeded rows' main cost on CPU)
    x = _vocab_hashes(vocab_size, keys.device) ^ keys[:, :1]  # (V,) ^ (R, 1) -> (R, V)
    x.add_(keys[:, 1:]).bitwise_and_(_M32)
    x = _mix32(x)
    u = (x >> 9).float().add_(0.5).mul_(2.0**-23)  # in [2**-24, 1 - 2**-24]: exact in float32
    return u.log_().neg_()


def seeded_uniform(keys: Tensor) -> Tensor:
    """keys (R, 2) int64 -> (R,) float32 uniform in (0, 1), one per key (exp(-q) of q ~ Exp(1) is uniform)."""
    return seeded_noise(keys, 1)[:, 0].neg_().exp_()


def exp_noise(rows: int, vocab_size: int, device: torch.device | str) -> Tensor:
    """(rows, V) float32 Exp(1) noise from the device's default generator, finite and above 0: a
    q of 0 would turn a masked token's 0 / q into NaN (which wins an argmax), a q of inf would make
    a near-greedy row's race all zeros. On CPU -log(rand) (rand's 0 clamped away) is ~5x faster
    than exponential_."""
    if torch.device(device).type == "cpu":
        return torch.rand(rows, vocab_size, device=device).clamp_(min=2.0**-25).log_().neg_()
    return torch.empty(rows, vocab_size, device=device).exponential_().clamp_(min=2.0**-25)


def row_noise(seed: int, position: int, vocab_size: int, device: torch.device | str = "cpu") -> Tensor:
    """(V,) float32: the Exp(1) noise of one seeded row (the oracle's and tests' view of `seeded_noise`)."""
    return seeded_noise(torch.tensor([_row_key(seed, position)], dtype=torch.int64, device=device), vocab_size)[0]


# -- the oracle ------------------------------------------------------------------------------------


def sample_reference(logits: Tensor, params: list[SamplingParams], positions: list[int], finite: Tensor | None = None) -> Tensor:
    """`sample`, one row at a time in plain steps: the test oracle. Seeded rows use the same noise,
    so their tokens are identical to `sample`'s; unseeded rows draw their own."""
    V = logits.shape[-1]
    tokens = []
    for i, p in enumerate(params):
        row = logits[i]
        ok = bool(finite[i]) if finite is not None else bool(torch.isfinite(row).all())
        if not ok:
            tokens.append(-1)
            continue
        if p.greedy:
            tokens.append(int(row.argmax()))
            continue
        probs = mask_row_reference(row / torch.tensor(p.temperature, dtype=torch.float32), p).softmax(-1)
        if p.seed is not None:
            q = row_noise(p.seed, positions[i], V, logits.device)
        else:
            q = exp_noise(1, V, logits.device)[0]
        best, token = (probs / q).max(-1)
        tokens.append(int(token) if float(best) > 0 else -1)
    return torch.tensor(tokens, dtype=torch.int64, device=logits.device)


def verify_reference(logits: Tensor, params: list[SamplingParams], positions: list[int], drafts: list[int],
                     finite: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`verify`, one row at a time in plain steps with unseeded noise: the test oracle of its rule."""
    tokens, accepted = [], []
    for i, (p, d) in enumerate(zip(params, drafts)):
        row = logits[i]
        ok = bool(finite[i]) if finite is not None else bool(torch.isfinite(row).all())
        if not ok:
            tokens.append(-1)
            accepted.append(False)
            continue
        if p.greedy:
            top = int(row.argmax())
            tokens.append(top)
            accepted.append(d >= 0 and top == d)
            continue
        probs = mask_row_reference(row / torch.tensor(p.temperature, dtype=torch.float32), p).softmax(-1)
        if d >= 0 and float(torch.rand(())) < float(probs[d]):
            tokens.append(d)
            accepted.append(True)
            continue
        if d >= 0:
            probs = probs.clone()
            probs[d] = 0.0
        tokens.append(int(torch.multinomial(probs, 1)))
        accepted.append(False)
    return torch.tensor(tokens, dtype=torch.int64), torch.tensor(accepted, dtype=torch.bool)


def mask_row_reference(row: Tensor, p: SamplingParams) -> Tensor:
    """row (V,) -> row with -inf outside its top-k, then top-p set: today's per-row steps."""
    V = row.shape[-1]
    if 0 < p.top_k < V:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, _NEG_INF)
    if p.top_p < 1.0:
        ordered = row.sort(descending=True).values
        probs = ordered.softmax(-1)
        keep = (probs.cumsum(-1) - probs) < p.top_p  # the mass before a token is below top_p ...
        keep[0] = True  # ... and the top token stays
        last = ordered[int(keep.sum()) - 1]  # the kept tokens are a prefix of the sorted row
        row = row.masked_fill(row < last, _NEG_INF)
    return row
