"""S²FT structured-sparse deltas for many adapters in one batch (Punica style, same plan as LoRA).

S²FT fine-tunes selected columns or rows of a weight W [d_out, d_in] (a linear computes y = x W^T).
The delta is served next to the base GEMM without touching W:
  column kind (input columns c, delta D [d_out, k]):  y += x[:, c] @ D^T           gather + GEMM
  row kind    (output rows c,   delta R [k, d_in]):   y[:, c] += x @ R^T           GEMM + scatter-add

Storage: per (layer, module), a pool of "entries" (one entry = one selected column or row); an
adapter owns entries [o, o+k), the role LoRA's rank rows play:
  column kind: col_idx [N] int64 (input column of each entry),  col_w [N, d_out] (row j = D[:, c_j])
  row kind:    row_idx [N] int64 (output row of each entry),    row_w [N, d_in]  (row j = R[j])
Padding entries (index 0, all-zero weights) contribute nothing; indices may repeat, so every
scatter accumulates (index_add_), never assigns.

Batch metadata is a LoraPlan (kernels.lora_plan.make_lora_plan) with seg_row_start[i] = first
entry o_i (-1 = no delta) and seg_rank[i] = entry count k_i: one plan per engine step serves
LoRA and S²FT modules alike, and the fast ops replay its precomputed index tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.lora import _upcast_gemms, batched_expand, batched_shrink
from kernels.lora_plan import LoraPlan

__all__ = ["s2ft_col", "s2ft_col_reference", "s2ft_row", "s2ft_row_reference", "s2ft_dense_delta"]


def _check(y: Tensor, x: Tensor, idx: Tensor, w: Tensor, plan: LoraPlan, kind: str) -> None:
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != plan.num_tokens or y.shape[0] != plan.num_tokens:
        raise ValueError(f"x {tuple(x.shape)} / y {tuple(y.shape)} do not match plan.num_tokens={plan.num_tokens}")
    width = y.shape[1] if kind == "col" else x.shape[1]  # col_w rows live in y's space, row_w rows in x's
    if (idx.dim() != 1 or idx.dtype != torch.long or w.dim() != 2 or w.shape[0] != idx.shape[0]
            or w.shape[1] != width or w.shape[0] < plan.row_end):
        raise ValueError(f"{kind} pool: idx {tuple(idx.shape)} {idx.dtype}, w {tuple(w.shape)} vs x {tuple(x.shape)} "
                         f"y {tuple(y.shape)}, plan needs {plan.row_end} entries")


def _check_range(idx: Tensor, limit: int, what: str) -> None:
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= limit):
        raise ValueError(f"{what} indices must lie in [0, {limit}), got [{int(idx.min())}, {int(idx.max())}]")


def s2ft_col_reference(y: Tensor, x: Tensor, col_idx: Tensor, col_w: Tensor, plan: LoraPlan) -> None:
    """Semantics: y[s_i:s_{i+1}] += x[s_i:s_{i+1}][:, idx[o_i:o_i+k_i]] @ W[o_i:o_i+k_i]   (idx = col_idx, W = col_w)

    x: [T, d_in], y: [T, d_out], col_idx: [N] int64 in [0, d_in), col_w: [N, d_out]; float32 or
    bfloat16. Readable loop over segments accumulating in float32; y updated in place, rounded once.
    """
    _check(y, x, col_idx, col_w, plan, "col")
    _check_range(col_idx, x.shape[1], "col_idx")
    for i, o in enumerate(plan.seg_row_start):
        s, e, k = plan.seg_indptr[i], plan.seg_indptr[i + 1], plan.seg_rank[i]
        if o < 0 or k == 0 or e == s:
            continue  # base model only
        cols = col_idx[o:o + k]
        delta = x[s:e].float()[:, cols] @ col_w[o:o + k].float()  # [n, d_out]
        y[s:e] = (y[s:e].float() + delta).to(y.dtype)


def s2ft_row_reference(y: Tensor, x: Tensor, row_idx: Tensor, row_w: Tensor, plan: LoraPlan) -> None:
    """Semantics: y[s_i:s_{i+1}][:, idx[o_i:o_i+k_i]] += x[s_i:s_{i+1}] @ W[o_i:o_i+k_i].T   (accumulating)

    x: [T, d_in], y: [T, d_out], row_idx: [N] int64 in [0, d_out), row_w: [N, d_in]; float32 or
    bfloat16. Repeated indices add up. Readable loop over segments accumulating in float32;
    y updated in place, rounded once.
    """
    _check(y, x, row_idx, row_w, plan, "row")
    _check_range(row_idx, y.shape[1], "row_idx")
    for i, o in enumerate(plan.seg_row_start):
        s, e, k = plan.seg_indptr[i], plan.seg_indptr[i + 1], plan.seg_rank[i]
        if o < 0 or k == 0 or e == s:
            continue
        h = x[s:e].float() @ row_w[o:o + k].float().T  # [n, k]: one column per selected output row
        acc = y[s:e].float()
        acc.index_add_(1, row_idx[o:o + k], h)
        y[s:e] = acc.to(y.dtype)


def _entry_tokens(plan: LoraPlan) -> Tensor:
    """Token of every bag entry [E] (bag order: token-major, then the adapter's entries)."""
    R = plan.max_rank
    if plan.h_pos is None:  # every (slot, entry) of h is real
        slot = torch.arange(plan.num_groups * plan.group_len, device=plan.bag_rows.device).repeat_interleave(R)
    else:
        slot = plan.h_pos.div(R, rounding_mode="floor")
    return slot.add_(plan.x_range[0]) if plan.x_range else plan.x_idx.index_select(0, slot)


# Per-step cache: a plan is built once per engine step and every (layer, module) call of that step
# reuses it, so the entry->token map (and its multiples by a row stride) is computed once per step,
# not once per call. One slot, for the last batched plan seen; holding the plan keeps its id from
# being reused. Plans are never mutated after make_lora_plan.
_last_plan: tuple[LoraPlan | None, dict[int, Tensor]] = (None, {})


def _entry_offsets(plan: LoraPlan, stride: int) -> Tensor:
    """token(entry) * stride for every bag entry; stride 1 gives the tokens themselves."""
    global _last_plan
    cached_plan, by_stride = _last_plan  # one tuple read: a racing thread at worst recomputes
    if cached_plan is not plan:
        by_stride = {1: _entry_tokens(plan)}
        _last_plan = (plan, by_stride)
    t = by_stride.get(stride)
    if t is None:
        t = by_stride[stride] = by_stride[1] * stride
    return t


def _flat(t: Tensor) -> Tensor:
    """1-D view of t's storage from t's first element: t[i, j] is flat[i * t.stride(0) + j * t.stride(1)]."""
    if t.is_contiguous():
        return t.view(-1)
    span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.as_strided((span,), (1,), t.storage_offset())


def s2ft_col(y: Tensor, x: Tensor, col_idx: Tensor, col_w: Tensor, plan: LoraPlan) -> None:
    """Semantics: y[s_i:s_{i+1}] += x[s_i:s_{i+1}][:, idx[o_i:o_i+k_i]] @ W[o_i:o_i+k_i]   (idx = col_idx, W = col_w)

    x: [T, d_in], y: [T, d_out] (2-D, any strides; updated in place), col_idx: [N] int64 (trusted to
    lie in [0, d_in): validate when writing the pool), col_w: [N, d_out] in x's dtype (fp32 or bf16).
    Loop path: index_select of the segment's columns + addmm_ on the pool view. Batched path: the
    delta is y[t] += sum_j x[t, c_j] * col_w[j], so the selected x values are read directly
    (one flat gather of E = sum(tokens * k) scalars, no [tokens, d_in] copy) and used as per-sample
    weights of an embedding_bag over col_w (read in place), exactly sgmv_lora's B pass; no Python
    loop per segment.
    """
    if plan.path == "none":
        return
    _check(y, x, col_idx, col_w, plan, "col")
    upcast = _upcast_gemms(x)
    for s, e, o, k in plan.loop_segs:
        xs, ys = (x, y) if e - s == plan.num_tokens else (x[s:e], y[s:e])
        h, d = xs.index_select(1, col_idx[o:o + k]), col_w[o:o + k]  # h: [n, k] gathered x columns
        if upcast:
            ys.add_(h.float() @ d.float())
        else:
            ys.addmm_(h, d)
    if plan.num_groups == 0:
        return
    # [E] = x[token, column] of every bag entry, read through a flat view (cheaper than 2-D indexing)
    cols = col_idx.index_select(0, plan.bag_rows)
    base, s1 = _entry_offsets(plan, x.stride(0)), x.stride(1)
    pos = base.add(cols) if s1 == 1 else base.add(cols, alpha=s1)
    w = _flat(x).index_select(0, pos)
    batched_expand(y, col_w, w.to(col_w.dtype) if w.dtype != col_w.dtype else w, plan)


def s2ft_row(y: Tensor, x: Tensor, row_idx: Tensor, row_w: Tensor, plan: LoraPlan) -> None:
    """Semantics: y[s_i:s_{i+1}][:, idx[o_i:o_i+k_i]] += x[s_i:s_{i+1}] @ W[o_i:o_i+k_i].T   (accumulating)

    x: [T, d_in], y: [T, d_out] (2-D, any strides; updated in place), row_idx: [N] int64 (trusted to
    lie in [0, d_out)), row_w: [N, d_in] in x's dtype (fp32 or bf16). GEMMs run in x's dtype, or
    fp32 for bf16 on CPUs without native bf16 GEMMs (as sgmv_lora); repeated indices accumulate.
    Loop path: mm on the pool view + index_add_ along y's columns. Batched path: sgmv_lora's A pass
    (gather x slots and row_w rows, bmm -> h [G, L, R]), keep h's real entries, then one
    accumulating scatter of E scalars at (token, row_idx[entry]); no Python loop per segment.
    """
    if plan.path == "none":
        return
    _check(y, x, row_idx, row_w, plan, "row")
    upcast = _upcast_gemms(x)
    for s, e, o, k in plan.loop_segs:
        xs, ys = (x, y) if e - s == plan.num_tokens else (x[s:e], y[s:e])
        r = row_w[o:o + k]
        h = xs.float() @ r.float().T if upcast else xs @ r.T  # [n, k]
        ys.index_add_(1, row_idx[o:o + k], h if h.dtype == y.dtype else h.to(y.dtype))
    if plan.num_groups == 0:
        return
    vals = batched_shrink(x, row_w, plan, upcast)  # [E] bag order
    if vals.dtype != y.dtype:
        vals = vals.to(y.dtype)
    # (token, row) pairs of every entry: accumulating index_put_ handles any y strides and repeated
    # pairs (padding entries all point at row 0); measured faster than index_add_ on a flat view.
    rows = row_idx.index_select(0, plan.bag_rows)
    y.index_put_((_entry_offsets(plan, 1), rows), vals, accumulate=True)


def s2ft_dense_delta(idx: Tensor, w: Tensor, kind: str, d_out: int, d_in: int) -> Tensor:
    """Dense ΔW [d_out, d_in] of one adapter's entries (idx [k], w [k, d_out] for "col" or [k, d_in] for
    "row"), so that y += x @ ΔW.T is the S²FT delta; repeated indices add up. Accumulated in float32,
    returned in w's dtype. For tests and reference checks, not for serving."""
    if kind not in ("col", "row"):
        raise ValueError(f"kind must be 'col' or 'row', got {kind!r}")
    width, limit = (d_out, d_in) if kind == "col" else (d_in, d_out)
    if idx.dim() != 1 or w.dim() != 2 or w.shape != (idx.shape[0], width):
        raise ValueError(f"{kind} delta: idx {tuple(idx.shape)}, w {tuple(w.shape)}, expected w [{idx.shape[0]}, {width}]")
    _check_range(idx, limit, f"{kind} idx")
    delta = torch.zeros(d_out, d_in, dtype=torch.float32, device=w.device)
    if kind == "col":
        delta.index_add_(1, idx.long(), w.float().T)  # column c_j of ΔW += W[j]
    else:
        delta.index_add_(0, idx.long(), w.float())  # row c_j of ΔW += W[j]
    return delta.to(w.dtype)
