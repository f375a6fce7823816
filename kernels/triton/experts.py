"""Triton routed LoRA experts: kernels.experts.routed_experts as one fused kernel (same signature and semantics).

Per (adapter a, token tile, i-tile) one program keeps the base pre-activations g, u of its tile and,
for every routing slot j (top-k: token t's j-th expert e_t; dense: expert j):
    ΔG = sg[a, t, E_e] @ gate_b[a, E_e, i-tile],  ΔU likewise     (E_e: rank rows [e·r, (e+1)·r))
    w·a_j = weights[a, t, j] · silu(g + ΔG) ⊙ (u + ΔU)             (fp32)
    act[a, t, i-tile] = Σ_j w·a_j                                   (stored once, rounded once)
    z[a, t, E_e] += w·a_j @ down_a[a, E_e, i-tile]ᵀ                (fp32 atomics across i-tiles)
Tokens of a tile may route to different experts, so each expansion is a tl.dot over the rank rows of
every expert some token of the tile uses, in BLOCK_R chunks, with each token's shrink masked to its own
expert's rows (the tensor-core form of the torch op's masked GEMM; chunks no token uses are skipped,
so a dense slot reads just its expert's rows). The down shrink z is fused: each program adds its
i-tile's share into an fp32 [A, n, E·r] buffer with atomics (their order varies, so z's last bits can
differ between runs), cast to act's dtype at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.experts import _check
from kernels.triton.autotune import AUTOTUNE_OPTIONS, configs, rank_bucket, register_prune, token_bucket
from kernels.triton.lora import dot_precision, mma

__all__ = ["routed_experts_triton"]


def _experts_tile(a: dict) -> int:
    # g, u, the slot sum, ΔG, ΔU and the weighted activation, [BLOCK_M, BLOCK_I] each; the shrink and
    # row-block operand tiles; the [BLOCK_M, BLOCK_R] z share
    m, i, r = a["BLOCK_M"], a["BLOCK_I"], a["BLOCK_R"]
    return 6 * m * i + 2 * m * r + r * i


@triton.autotune(
    configs=configs(dict(BLOCK_M=16, BLOCK_I=32, BLOCK_R=16),
                    [dict(BLOCK_M=bm, BLOCK_I=bi, BLOCK_R=br, num_warps=nw)
                     for bm, bi, nw in ((16, 32, 4), (16, 64, 4), (16, 128, 8), (32, 64, 8), (64, 64, 8))
                     for br in (16, 32)]),
    key=["i_size", "rank_bucket", "tok_bucket"], reset_to_zero=["z_ptr"], prune_configs_by=register_prune(_experts_tile),
    **AUTOTUNE_OPTIONS)
@triton.jit(do_not_specialize=["n", "r", "num_slots", "er", "has_gate", "has_up", "has_down", "dense", "rank_bucket",
                               "tok_bucket", "s_a", "s_t", "e_a", "e_t", "e_j", "w_a", "w_t", "w_j"],
            do_not_specialize_on_alignment=["sg_ptr", "su_ptr", "ex_ptr", "w_ptr"])
def _routed_experts_kernel(gu_ptr, sg_ptr, su_ptr, gb_ptr, ub_ptr, da_ptr, ex_ptr, w_ptr, act_ptr, z_ptr,
                           n, i_size, r, num_slots, er, has_gate, has_up, has_down, dense, rank_bucket, tok_bucket,
                           gu_a, gu_t, gu_i, s_a, s_t, b_a, b_r, b_i, e_a, e_t, e_j, w_a, w_t, w_j,
                           act_a, act_t, act_i, z_a, z_t,
                           PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr):
    # sg/su share strides (s_a, s_t; unit stride along rank rows), as do gate_b/up_b/down_a (b_a, b_r, b_i)
    ad = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    pid_i = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    m_mask, i_mask = offs_m < n, offs_i < i_size
    tok = offs_m.to(tl.int64)
    mi_mask = m_mask[:, None] & i_mask[None, :]
    gu = gu_ptr + ad * gu_a + tok[:, None] * gu_t + offs_i[None, :] * gu_i
    g = tl.load(gu, mask=mi_mask, other=0.0).to(tl.float32)
    u = tl.load(gu + i_size * gu_i, mask=mi_mask, other=0.0).to(tl.float32)
    s_rows = ad * s_a + tok * s_t  # [BLOCK_M] offsets of the tokens' shrink rows
    b_base = ad * b_a + offs_i * b_i  # [BLOCK_I] offsets of the i-tile in a row block
    acc = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
    for j in range(num_slots):
        w = tl.load(w_ptr + ad * w_a + tok * w_t + j * w_j, mask=m_mask, other=0.0).to(tl.float32)
        if dense != 0:
            e = tl.full((BLOCK_M,), j, tl.int32)
        else:
            e = tl.load(ex_ptr + ad * e_a + tok * e_t + j * e_j, mask=m_mask, other=0).to(tl.int32)
        lo = e * r  # [BLOCK_M] first rank row of each token's expert
        # rank-row chunks some token of the tile needs
        c_first = tl.min(tl.where(m_mask, lo, er), axis=0) // BLOCK_R * BLOCK_R
        c_end = tl.max(tl.where(m_mask, lo + r, 0), axis=0)
        dg = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
        du = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
        for c0 in range(c_first, c_end, BLOCK_R):
            offs_c = c0 + tl.arange(0, BLOCK_R)
            own = (offs_c[None, :] >= lo[:, None]) & (offs_c[None, :] < lo[:, None] + r) & m_mask[:, None]  # [M, R]
            if tl.max(own.to(tl.int32)) > 0:
                ci_mask = (offs_c < er)[:, None] & i_mask[None, :]
                b_off = offs_c[:, None].to(tl.int64) * b_r + b_base[None, :]
                s_off = s_rows[:, None] + offs_c[None, :]
                if has_gate != 0:
                    bt = tl.load(gb_ptr + b_off, mask=ci_mask, other=0.0)
                    st = tl.load(sg_ptr + s_off, mask=own, other=0.0)
                    dg = mma(st.to(bt.dtype), bt, dg, PRECISION)
                if has_up != 0:
                    bt = tl.load(ub_ptr + b_off, mask=ci_mask, other=0.0)
                    st = tl.load(su_ptr + s_off, mask=own, other=0.0)
                    du = mma(st.to(bt.dtype), bt, du, PRECISION)
        gate = g + dg
        wa = w[:, None] * (gate * tl.sigmoid(gate)) * (u + du)  # w · silu(g') ⊙ u'
        acc += wa
        if has_down != 0:  # this i-tile's share of the slot's down shrink, on its expert's rows only
            for c0 in range(c_first, c_end, BLOCK_R):
                offs_c = c0 + tl.arange(0, BLOCK_R)
                own = (offs_c[None, :] >= lo[:, None]) & (offs_c[None, :] < lo[:, None] + r) & m_mask[:, None]
                if tl.max(own.to(tl.int32)) > 0:
                    dt = tl.load(da_ptr + offs_c[None, :].to(tl.int64) * b_r + b_base[:, None],
                                 mask=(offs_c < er)[None, :] & i_mask[:, None], other=0.0)  # [I, R]: down_a rows, transposed
                    zs = mma(wa.to(dt.dtype), dt, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), PRECISION)
                    tl.atomic_add(z_ptr + ad * z_a + tok[:, None] * z_t + offs_c[None, :], zs, mask=own)
    act_ptrs = act_ptr + ad * act_a + tok[:, None] * act_t + offs_i[None, :] * act_i
    tl.store(act_ptrs, acc.to(act_ptr.dtype.element_ty), mask=mi_mask)


def routed_experts_triton(act: Tensor, gate_up: Tensor, sg: Tensor | None, su: Tensor | None, gate_b: Tensor | None,
                          up_b: Tensor | None, down_a: Tensor | None, experts: Tensor | None, weights: Tensor,
                          num_experts: int) -> Tensor | None:
    """Semantics: as kernels.experts.routed_experts_reference (same arguments and result): for every adapter a,
    token t and slot j (expert e = experts[a, t, j], or j when experts is None; w = weights[a, t, j]),
        a_atj = silu(gate_up[a, t, :i] + sg[a, t, E_e] @ gate_b[a, E_e]) ⊙ (gate_up[a, t, i:] + su[a, t, E_e] @ up_b[a, E_e])
        act[a, t] = Σ_j w · a_atj;   z[a, t, E_e] += w · a_atj @ down_a[a, E_e]ᵀ   (returned; None without down_a)

    act [A, n, i] (overwritten), gate_up [A, n, 2i], sg/su [A, n, E·r] (rows unit-stride), gate_b/up_b/
    down_a [A, E·r, i] (rows unit-stride), experts [A, n, k] int or None, weights [A, n, k] or [A, n, E];
    tensors on the kernels' device (CUDA, or CPU under TRITON_INTERPRET=1). One fused kernel (module
    docstring) plus the fp32 z buffer's zero-fill and cast; no host sync. Computes in fp32 (the row
    blocks' dtype at the MMAs) and rounds act once.
    """
    r = _check(act, gate_up, sg, su, experts, weights, num_experts, (gate_b, up_b, down_a))
    A, n, i = act.shape
    er = num_experts * r
    z = torch.zeros(A, n, er, dtype=torch.float32, device=act.device) if down_a is not None else None
    if A == 0 or n == 0 or er == 0:
        return z.to(act.dtype) if z is not None else None
    shrinks, blocks = [s for s in (sg, su) if s is not None], [b for b in (gate_b, up_b, down_a) if b is not None]
    if any(t.stride(-1) != 1 for t in shrinks + blocks) or len({t.stride() for t in shrinks}) > 1:
        sg, su = (s.contiguous() if s is not None else None for s in (sg, su))  # one set of shrink strides, unit rows
    if len({b.stride() for b in blocks}) > 1 or any(b.stride(-1) != 1 for b in blocks):
        gate_b, up_b, down_a = (b.contiguous() if b is not None else None for b in (gate_b, up_b, down_a))
    # Absent operands are stood in for by present ones of the same dtype (the autotune key holds every
    # tensor argument's dtype, so it is the same whichever modules an adapter has); never read.
    block = next((b for b in (gate_b, up_b, down_a) if b is not None), gate_up)
    shrink = next((s for s in (sg, su) if s is not None), gate_up)
    w = weights if weights.dtype == torch.float32 else weights.float()  # likewise one dtype in the key
    ex = experts if experts is None or experts.dtype == torch.int64 else experts.long()
    ex_arg = ex if ex is not None else _stand_in(act.device, torch.int64)
    z_arg = z if z is not None else _stand_in(act.device, torch.float32)  # not w: the autotuner zeroes z_ptr
    grid = lambda META: (A, triton.cdiv(n, META["BLOCK_M"]), triton.cdiv(i, META["BLOCK_I"]))  # noqa: E731
    _routed_experts_kernel[grid](
        gate_up, sg if sg is not None else shrink, su if su is not None else shrink,
        gate_b if gate_b is not None else block, up_b if up_b is not None else block,
        down_a if down_a is not None else block, ex_arg, w, act, z_arg,
        n, i, r, weights.shape[-1], er, int(gate_b is not None), int(up_b is not None), int(down_a is not None),
        int(ex is None), rank_bucket(r), token_bucket(n),
        gate_up.stride(0), gate_up.stride(1), gate_up.stride(2), shrink.stride(0), shrink.stride(1),
        block.stride(0), block.stride(1), block.stride(2), ex_arg.stride(0), ex_arg.stride(1), ex_arg.stride(2),
        w.stride(0), w.stride(1), w.stride(2), act.stride(0), act.stride(1), act.stride(2), z_arg.stride(0), z_arg.stride(1),
        PRECISION=dot_precision(block.dtype))
    return z.to(act.dtype) if z is not None else None


_STAND_INS: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _stand_in(device: torch.device, dtype: torch.dtype) -> Tensor:
    """A [1, 1, 1] tensor passed for an absent argument (one per device and dtype, allocated once)."""
    t = _STAND_INS.get((device, dtype))
    if t is None:
        t = _STAND_INS[(device, dtype)] = torch.zeros(1, 1, 1, dtype=dtype, device=device)
    return t
