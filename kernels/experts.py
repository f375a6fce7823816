"""Routed LoRA experts on an MLP: every expert's activation, mixed before the one shared down GEMM.

Each expert e is the base MLP with a LoRA on gate, up and down. For a token with MLP input x, base
pre-activations g = x W_gᵀ, u = x W_uᵀ (computed once, for every token, by the base GEMM) and
routing weights w_e (zero for experts it is not routed to):

    out = Σ_e w_e · [ a_e W_dᵀ + (a_e A_D,eᵀ) B_D,e ],   a_e = silu(g + (x A_G,eᵀ) B_G,e) ⊙ (u + (x A_U,eᵀ) B_U,e)

The down projection is linear, so Σ_e w_e a_e W_dᵀ = (Σ_e w_e a_e) W_dᵀ: the experts' activations are
mixed first and the base down GEMM runs once per token (the model's own). What is left per expert is
the down LoRA's shrink, whose weighted sum z is expanded once: Σ_e w_e (a_e A_D,eᵀ) B_D,e = z B_D.

`routed_experts` computes the mixed activation and z from the shrinks sg = x A_Gᵀ, su = x A_Uᵀ (all
experts' rank rows at once: the caller's one GEMM), for a group of adapters with experts of the same
shape at once (a leading adapter dimension). Expert e owns rank rows [e·r, (e+1)·r) of every row block
(gate_b, up_b, down_a: the adapters' rows of the LoRA pools, scale folded into the B rows).

`segment_running_sums` gives per-sequence causal running sums of a layer's inputs (MoLE's global gates
pool them: server.families.moe), continuing sums carried over from earlier steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["routed_experts", "routed_experts_reference", "segment_running_sums", "segment_running_sums_reference", "TOPK_MIN_TOKENS"]

# Top-k routing computes only the chosen experts' activations (k per token, k-major masked GEMMs) from
# this many tokens on; below it every expert's (E per token, one bmm over experts), which is fewer and
# cheaper ops when the elementwise work is small (decode steps). Both are exact.
TOPK_MIN_TOKENS = 32


def _check(act: Tensor, gate_up: Tensor, sg: Tensor | None, su: Tensor | None, experts: Tensor | None, weights: Tensor, num_experts: int,
           blocks: tuple[Tensor | None, ...]) -> int:  # fmt: skip
    """The expert rank r; ValueError if the shapes do not fit (see routed_experts_reference)."""
    A, n, i = act.shape
    er = next((b.shape[1] for b in blocks if b is not None), num_experts)
    if gate_up.shape != (A, n, 2 * i) or er % num_experts:
        raise ValueError(f"act {tuple(act.shape)}, gate_up {tuple(gate_up.shape)}, expert rows {er} for {num_experts} experts do not fit")
    for b in blocks:
        if b is not None and b.shape != (A, er, i):
            raise ValueError(f"expert row block {tuple(b.shape)} must be ({A}, {er}, {i})")
    for s, b in ((sg, blocks[0]), (su, blocks[1])):
        if (s is None) != (b is None) or (s is not None and s.shape != (A, n, er)):
            raise ValueError(f"a shrink must be ({A}, {n}, {er}) where its row block is given and None where not, got {None if s is None else tuple(s.shape)}")
    slots = num_experts if experts is None else experts.shape[-1]
    if weights.shape != (A, n, slots) or (experts is not None and experts.shape != (A, n, slots)):
        raise ValueError(f"weights {tuple(weights.shape)} / experts {None if experts is None else tuple(experts.shape)} must be ({A}, {n}, {slots})")
    return er // num_experts


def routed_experts_reference(act: Tensor, gate_up: Tensor, sg: Tensor | None, su: Tensor | None, gate_b: Tensor | None, up_b: Tensor | None,
                             down_a: Tensor | None, experts: Tensor | None, weights: Tensor, num_experts: int) -> Tensor | None:  # fmt: skip
    """Semantics, for A adapters (same number of experts E and rank r) with n token rows each: for every adapter
    a, token t and slot j (expert e = experts[a, t, j], or e = j when experts is None; w = weights[a, t, j]),
    with i = act.shape[-1] and E_e = rows [e·r, (e+1)·r) of the adapter's row block:
        a_atj = silu(gate_up[a, t, :i] + sg[a, t, E_e] @ gate_b[a, E_e]) ⊙ (gate_up[a, t, i:] + su[a, t, E_e] @ up_b[a, E_e])
        act[a, t] = Σ_j w · a_atj                                       (act's rows are overwritten)
        z[a, t, E_e] += w · a_atj @ down_a[a, E_e]ᵀ                     (returned, (A, n, E·r); None without down_a)

    act: [A, n, i]; gate_up: [A, n, 2i] base pre-activations; sg, su: [A, n, E·r] the tokens' gate/up
    shrinks (None exactly where gate_b / up_b is); gate_b, up_b, down_a: [A, E·r, i] (None: that module
    has no expert LoRA, its delta is zero); experts: [A, n, k] int or None; weights: [A, n, k] (or
    [A, n, E]). Readable loop over adapters, tokens and slots in float32.
    """
    r = _check(act, gate_up, sg, su, experts, weights, num_experts, (gate_b, up_b, down_a))
    A, n, i = act.shape
    z = torch.zeros(A, n, num_experts * r) if down_a is not None else None
    for ad in range(A):
        for t in range(n):
            mixed = torch.zeros(i)
            for j in range(weights.shape[-1]):
                e = j if experts is None else int(experts[ad, t, j])
                rows, w = slice(e * r, (e + 1) * r), float(weights[ad, t, j])
                g, u = gate_up[ad, t, :i].float(), gate_up[ad, t, i:].float()
                if gate_b is not None:
                    g = g + sg[ad, t, rows].float() @ gate_b[ad, rows].float()
                if up_b is not None:
                    u = u + su[ad, t, rows].float() @ up_b[ad, rows].float()
                a = F.silu(g) * u
                mixed += w * a
                if z is not None:
                    z[ad, t, rows] += w * (a @ down_a[ad, rows].float().T)
            act[ad, t] = mixed.to(act.dtype)
    return z.to(act.dtype) if z is not None else None


def routed_experts(act: Tensor, gate_up: Tensor, sg: Tensor | None, su: Tensor | None, gate_b: Tensor | None, up_b: Tensor | None,
                   down_a: Tensor | None, experts: Tensor | None, weights: Tensor, num_experts: int) -> Tensor | None:  # fmt: skip
    """Semantics: as routed_experts_reference (same arguments; act must be contiguous).

    Tensor ops only: no host sync, no per-adapter, per-token or per-expert Python loop, and few ops (a
    decode step calls this once per group of adapters and layer, where each op's fixed cost is much of
    the time). The work is batched over adapters and "slots", each slot with its own (n, i) activation,
    in one of two exact layouts:
    - every expert (experts is None, or top-k with fewer than TOPK_MIN_TOKENS tokens): slot e is
      expert e, one bmm over (adapter, expert) with each one's r rank rows, routing weights dense
      (zero where a token is not routed);
    - top-k: slot j is each token's j-th choice; its shrink is masked to that expert's rank rows so
      one GEMM per adapter over all E·r rows expands it (k activations per token instead of E).
    a = silu(g + ΔG) ⊙ (u + ΔU) ⊙ w per slot; act = Σ slots, z = the slots' down shrinks, each kept on
    its own expert's rank rows.
    """
    r = _check(act, gate_up, sg, su, experts, weights, num_experts, (gate_b, up_b, down_a))
    A, n, i = act.shape
    E, er = num_experts, num_experts * r
    if n == 0:
        return act.new_zeros(A, 0, er) if down_a is not None else None
    w = weights if weights.dtype == act.dtype else weights.to(act.dtype)
    if experts is not None and n < TOPK_MIN_TOKENS and experts.shape[-1] < E:  # dense routing weights (A, n, E)
        w = act.new_zeros(A, n, E).scatter_(2, experts, w)
        experts = None
    if experts is None:  # slot e = expert e: its shrink columns against its own B rows
        slots, mask = E, None

        def expand(base: Tensor, s: Tensor, b: Tensor) -> Tensor:  # (A, E, n, i)
            lhs = s.view(A, n, E, r).transpose(1, 2).reshape(A * E, n, r)
            return torch.bmm(lhs, b.view(A * E, r, i)).view(A, E, n, i).add_(base.unsqueeze(1))
    else:  # slot j of every token: its expert's rank rows kept, the others zeroed
        slots = experts.shape[-1]
        mask = (experts.transpose(1, 2).unsqueeze(-1) == torch.arange(E, device=experts.device)).to(act.dtype).unsqueeze(-1)  # (A, k, n, E, 1)

        def expand(base: Tensor, s: Tensor, b: Tensor) -> Tensor:  # (A, k, n, i)
            lhs = (s.view(A, 1, n, E, r) * mask).reshape(A, slots * n, er)
            return torch.bmm(lhs, b).view(A, slots, n, i).add_(base.unsqueeze(1))
    g, u = gate_up[..., :i], gate_up[..., i:]
    # a = silu(g') ⊙ u' ⊙ w, in place on whichever of g', u' has the slots' dimension (fewer big allocations)
    u = expand(u, su, up_b) if up_b is not None else u.unsqueeze(1)
    if gate_b is not None:
        a = F.silu(expand(g, sg, gate_b), inplace=True).mul_(u)
    else:
        a = u.mul_(F.silu(g).unsqueeze(1)) if up_b is not None else F.silu(g).unsqueeze(1) * u  # (A, 1, n, i): no expert changes gate or up
    a = a.mul_(w.transpose(1, 2).unsqueeze(-1)) if a.shape[1] == slots else a * w.transpose(1, 2).unsqueeze(-1)  # w · a_e
    torch.sum(a, 1, out=act)
    if down_a is None:
        return None
    if mask is None:  # (A·E, n, r): expert e's shrink of its weighted activation
        z = torch.bmm(a.reshape(A * E, n, i), down_a.view(A * E, r, i).transpose(1, 2))
        return z.view(A, E, n, r).transpose(1, 2).reshape(A, n, er)
    sd = torch.bmm(a.reshape(A, slots * n, i), down_a.transpose(1, 2)).view(A, slots, n, E, r)  # every expert's shrink of each slot ...
    return (sd * mask).sum(1).view(A, n, er)  # ... keeping the slot's own expert's


def segment_running_sums_reference(x: Tensor, seg: Tensor, first: Tensor, base: Tensor) -> Tensor:
    """Semantics: out[t] = base[s] + Σ_{first[s] <= u <= t} x[u]   for every row t of segment s = seg[t],
    except that an element is NaN from a non-finite input on: out[t, j] is NaN if some x[u, j] with
    first[s] <= u <= t is inf or NaN (it stays in its own segment: segments are separate sequences,
    often of other tenants).

    x: [n, d] rows grouped into contiguous segments (segment s starts at row first[s]; seg[t]: the
    segment of row t, non-decreasing); base: [S, d] float64 sums carried into each segment. Returns
    float64 [n, d]. Readable loop over rows, accumulating in float64.
    """
    out = torch.empty(x.shape, dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        s = int(seg[t])
        prev = base[s] if t == int(first[s]) else out[t - 1]
        xt = x[t].double()
        out[t] = torch.where(torch.isfinite(xt), prev + xt, math.nan)
    return out


def segment_running_sums(x: Tensor, seg: Tensor, first: Tensor, base: Tensor) -> Tensor:
    """Semantics: as segment_running_sums_reference (same arguments).

    One float64 cumsum over all rows, each segment's offset taken back at its first row. Non-finite
    inputs are summed as 0 and their own segment's elements set to NaN from them on (a count of them,
    cumulated the same way), so they never reach another segment. Float64 sums of float32 inputs are
    exact while a sum stays within 2^29 of its inputs' magnitudes (otherwise they differ by float64
    rounding, ~1e-16 relative), so a segment's sums do not depend on the segments before it nor on
    how a sequence was split into steps. No host sync, no loop.
    """
    x64 = x.to(torch.float64)
    bad = ~torch.isfinite(x64)
    x64 = x64.masked_fill(bad, 0.0)
    cs = x64.cumsum(0)
    before = cs.index_select(0, first) - x64.index_select(0, first)  # Σ of the rows before each segment
    out = cs.add_((base - before).index_select(0, seg))
    bad_cs = bad.to(torch.int32).cumsum(0)  # exact counts
    bad_before = bad_cs.index_select(0, first) - bad.index_select(0, first).to(torch.int32)
    return out.masked_fill_(bad_cs > bad_before.index_select(0, seg), math.nan)
