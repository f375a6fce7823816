"""LoraPlan: per-step segment metadata plus the index tensors sgmv_lora replays on every call.

Built once per engine step (Python loops are fine here); every (layer, module) call then
runs a fixed, short sequence of torch ops with no Python loop over segments (batched path).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from kernels.staging import HostStaging

__all__ = ["LoraPlan", "make_lora_plan", "make_bgmv_plan", "LONG_SEGMENT_TOKENS", "LOOP_MAX_SEGMENTS"]

# Path choice, from sweeps on the 2-core AVX2 dev box (d_in=576, d_out 576/1536, rank 16, fp32):
# a loop step (mm + addmm_ on pool views) costs ~13 us (1 thread) to ~20-30 us (2 threads) per
# segment; the batched path ~45 us fixed plus gather work, but its B pass is a per-token GEMV.
# Segments this long run as their own GEMM (loop wins at >= 48-128 tokens with 2 threads,
# >= 32 with 1 thread):
LONG_SEGMENT_TOKENS = 64
# ...and if at most this many short segments remain, they loop too (batched wins from ~3-4 on).
LOOP_MAX_SEGMENTS = 3

_I64 = torch.long


@dataclass(slots=True)
class LoraPlan:
    """Per-step adapter metadata, built ONCE per engine step and reused by every (layer, module) call.

    path: "none"    every segment is base (or empty): the op returns at once.
          "loop"    one mm + addmm_ per segment in loop_segs, on contiguous pool views (no copy).
          "batched" the short segments as G groups of L token slots x R rank rows (a segment
                    longer than L spans several groups): gather x slots and A rows, bmm ->
                    h [G, L, R], then embedding_bag over the B pool with h as per-sample weights
                    (B is read in place; padded slots / rank rows are left out of the bags).
          "loop+batched" long segments (>= LONG_SEGMENT_TOKENS) loop, the rest is batched.
          "bgmv"    one adapter row range per token, from device tensors (tok_row, tok_rank; row -1 =
                    no delta): no host data at all, so a CUDA graph can replay it with new rows
                    (make_bgmv_plan). The segment fields are empty.
    """

    num_tokens: int
    seg_indptr: list[int]
    seg_row_start: list[int]
    seg_rank: list[int]
    path: str = "none"
    # (tok_start, tok_end, row_start, rank) of every non-empty LoRA segment ...
    lora_segs: tuple[tuple[int, int, int, int], ...] = ()
    # ... and of those run by the loop path.
    loop_segs: tuple[tuple[int, int, int, int], ...] = ()
    row_end: int = 0  # pools need at least this many rows (max o_i + r_i)
    seg_max_rank: int = 0  # the largest rank of lora_segs
    # --- batched path ---
    num_groups: int = 0  # G
    group_len: int = 0  # L (token slots per group)
    max_rank: int = 0  # R (rank rows per group)
    x_range: tuple[int, int] | None = None  # slots == x[lo:hi]: slice instead of gather
    x_idx: Tensor | None = field(default=None, repr=False)  # [G*L] token per slot (pads repeat one)
    a_rows: Tensor | None = field(default=None, repr=False)  # [G*R] A-pool row per rank slot (pads repeat o_i)
    h_pos: Tensor | None = field(default=None, repr=False)  # [E] valid entries of h.flatten(); None = all
    bag_rows: Tensor | None = field(default=None, repr=False)  # [E] B-pool row per bag entry
    bag_offsets: Tensor | None = field(default=None, repr=False)  # [T_lora] first entry of each token's bag
    y_range: tuple[int, int] | None = None  # LoRA tokens == y[lo:hi] in bag order: slice add
    y_idx: Tensor | None = field(default=None, repr=False)  # [T_lora] token of each bag (index_add_)
    # Device metadata of the Triton kernels (kernels.triton.lora.plan_meta), built on first use and
    # cached here so every (layer, module) call of the step reuses one host->device copy.
    triton_meta: object = field(default=None, repr=False)
    # The C++ CPU op's (kernels.cpu_lora) segment table: [S, 4] int64 (tok_start, tok_end, row_start,
    # rank) of the short segments, built on first use and reused by every module of the step.
    cpu_segs: Tensor | None = field(default=None, repr=False)
    # --- bgmv path ---
    tok_row: Tensor | None = field(default=None, repr=False)  # [T] first pool row of each token's adapter, -1 = none
    tok_rank: Tensor | None = field(default=None, repr=False)  # [T] its rank (max_rank bounds them all)
    bgmv_rows: Tensor | None = field(default=None, repr=False)  # [T, max_rank] pool row per (token, rank slot), clamped valid
    bgmv_mask: Tensor | None = field(default=None, repr=False)  # [T, max_rank] which of them are real


def make_bgmv_plan(tok_row: Tensor, tok_rank: Tensor, max_rank: int) -> LoraPlan:
    """A plan from per-token rows on the device (`bgmv` path): tok_row [T] (-1 = base), tok_rank [T] <= max_rank.
    Device ops only, so it can be built inside a captured CUDA graph from its static buffers."""
    T = tok_row.shape[0]
    slots = torch.arange(max_rank, device=tok_row.device)
    mask = (slots < tok_rank.unsqueeze(1)) & (tok_row.unsqueeze(1) >= 0)  # [T, R]
    rows = (tok_row.clamp(min=0).unsqueeze(1) + slots) * mask  # masked slots read row 0: any valid row
    return LoraPlan(num_tokens=T, seg_indptr=[0, T], seg_row_start=[-1], seg_rank=[0], path="bgmv", max_rank=max_rank,
                    tok_row=tok_row, tok_rank=tok_rank, bgmv_rows=rows, bgmv_mask=mask)


def make_lora_plan(
    seg_indptr: Sequence[int],
    seg_row_start: Sequence[int],
    seg_rank: Sequence[int],
    device: torch.device | str | None = None,
    staging: "HostStaging | None" = None,
) -> LoraPlan:
    """Validate segment metadata, choose the path and precompute its index tensors on `device`: at
    once, or with `staging` (kernels.staging.HostStaging) as part of the step's one host->device copy,
    in which case they exist once the staging is uploaded."""
    indptr, starts, ranks = [int(v) for v in seg_indptr], [int(v) for v in seg_row_start], [int(v) for v in seg_rank]
    n_seg = len(starts)
    if len(indptr) != n_seg + 1 or len(ranks) != n_seg:
        raise ValueError(f"need len(seg_indptr) == len(seg_row_start) + 1 == len(seg_rank) + 1, got "
                         f"{len(indptr)}, {n_seg}, {len(ranks)}")
    if indptr[0] != 0 or any(b < a for a, b in zip(indptr, indptr[1:])):
        raise ValueError(f"seg_indptr must start at 0 and be non-decreasing: {indptr}")
    if any(o < -1 for o in starts) or any(r < 0 for r, o in zip(ranks, starts) if o >= 0):
        raise ValueError("seg_row_start must be >= -1 and seg_rank >= 0")
    plan = LoraPlan(num_tokens=indptr[-1], seg_indptr=indptr, seg_row_start=starts, seg_rank=ranks)
    # Empty segments and rank-0 adapters contribute nothing: drop them once, here.
    segs = tuple((indptr[i], indptr[i + 1], starts[i], ranks[i]) for i in range(n_seg)
                 if starts[i] >= 0 and ranks[i] > 0 and indptr[i + 1] > indptr[i])
    plan.lora_segs = segs
    plan.row_end = max((o + r for _, _, o, r in segs), default=0)
    plan.seg_max_rank = max((r for *_, r in segs), default=0)
    if not segs:
        return plan
    short = tuple(sg for sg in segs if sg[1] - sg[0] < LONG_SEGMENT_TOKENS)
    if len(short) <= LOOP_MAX_SEGMENTS:
        plan.path, plan.loop_segs = "loop", segs
        return plan
    plan.loop_segs = tuple(sg for sg in segs if sg[1] - sg[0] >= LONG_SEGMENT_TOKENS)
    _build_batched(plan, short, torch.device(device) if device is not None else torch.device("cpu"), staging)
    plan.path = "loop+batched" if plan.loop_segs else "batched"
    return plan


def _pick_group_len(lens: list[int], max_rank: int) -> int:
    # Padding every group to the hot adapter's length wastes token slots; splitting long segments
    # into chunks of L re-gathers their A rows per chunk. Both move ~d_in elements per slot/row.
    def cost(L: int) -> int:
        return sum(-(-n // L) for n in lens) * (L + max_rank)

    top = max(lens)
    candidates = sorted({n for n in lens} | {1 << k for k in range(top.bit_length())})
    return min((c for c in candidates if c <= top), key=lambda L: (cost(L), -L))


def _as_range(idx: array) -> tuple[int, int] | None:
    lo = idx[0]
    return (lo, lo + len(idx)) if idx == array("q", range(lo, lo + len(idx))) else None


def _build_batched(plan: LoraPlan, segs: tuple[tuple[int, int, int, int], ...], device: torch.device,
                   staging: "HostStaging | None" = None) -> None:
    R = max(r for _, _, _, r in segs)
    L = _pick_group_len([e - s for s, e, _, _ in segs], R)
    # array('q') + one frombuffer: ~10x cheaper than torch.tensor(list) per element.
    x_idx = array("q")  # token per slot, G*L
    a_rows = array("q")  # pool row per rank slot, G*R
    h_pos = array("q")  # valid (slot, rank) entries of h [G, L, R], flattened
    bag_rows = array("q")
    bag_offsets = array("q")
    y_idx = array("q")
    g = 0
    for s, e, o, r in segs:
        for c in range(s, e, L):
            n = min(L, e - c)
            x_idx.extend(range(c, c + n))
            x_idx.extend([c] * (L - n))
            a_rows.extend(range(o, o + r))
            a_rows.extend([o] * (R - r))
            for k in range(n):  # one bag per real token: its r rank rows, weights from h
                bag_offsets.append(len(bag_rows))
                h_pos.extend(range((g * L + k) * R, (g * L + k) * R + r))
                bag_rows.extend(range(o, o + r))
                y_idx.append(c + k)
            g += 1
    plan.num_groups, plan.group_len, plan.max_rank = g, L, R
    plan.x_range, plan.y_range = _as_range(x_idx), _as_range(y_idx)
    dense = len(h_pos) == g * L * R  # no padded slot or rank: bags read h as is
    parts = {"a_rows": a_rows, "bag_offsets": bag_offsets}
    if plan.x_range is None:
        parts["x_idx"] = x_idx
    if plan.y_range is None:
        parts["y_idx"] = y_idx
    if not dense:
        parts["h_pos"] = h_pos
    if not (dense and L == 1):  # else bag_rows == a_rows
        parts["bag_rows"] = bag_rows
    if staging is not None:
        for name, v in parts.items():
            staging.add(v, partial(setattr, plan, name))
        if "bag_rows" not in parts:
            staging.add((), lambda _: setattr(plan, "bag_rows", plan.a_rows))  # after a_rows has arrived
        return
    flat = array("q")
    for v in parts.values():
        flat.extend(v)
    packed = torch.frombuffer(flat, dtype=_I64).to(device, copy=True)  # one host->device copy
    at = 0
    for name, v in parts.items():
        setattr(plan, name, packed[at:at + len(v)])
        at += len(v)
    if plan.bag_rows is None:
        plan.bag_rows = plan.a_rows
