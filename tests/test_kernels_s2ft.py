"""S²FT structured-sparse delta ops: the fast ops must equal the readable references (and the dense
formula y += x @ ΔW^T) on every adapter-popularity pattern, entry count, plan path and dtype."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from kernels import (LoraPlan, make_lora_plan, s2ft_col, s2ft_col_reference, s2ft_dense_delta, s2ft_row,
                     s2ft_row_reference)
from kernels.lora_plan import LONG_SEGMENT_TOKENS
from tests.test_kernels import PATTERNS, pick_adapters, tolerances

MIXED_ENTRIES = [3, 17, 46, 64]
KINDS = ["col", "row"]
OPS = {"col": (s2ft_col, s2ft_col_reference), "row": (s2ft_row, s2ft_row_reference)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


@dataclass
class Batch:
    kind: str
    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor  # col_idx or row_idx [N]
    w: torch.Tensor  # col_w [N, d_out] or row_w [N, d_in]
    plan: LoraPlan


def make_pool(kind: str, entries: list[int], d_in: int, d_out: int, dtype: torch.dtype, rng: random.Random,
              gen: torch.Generator, pad_frac: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Entry pool for adapters of `entries` allocated entries each: distinct indices per adapter, the
    last ~pad_frac of each adapter's entries are padding (index 0, zero weights), gaps of junk rows
    between adapters (must never be read). Returns idx [N], w [N, width], first entry per adapter."""
    limit, width = (d_in, d_out) if kind == "col" else (d_out, d_in)
    n_total = 2 + sum(k + 2 for k in entries) + 1
    idx = torch.randint(0, limit, (n_total,), generator=gen)  # junk in the gaps: valid, but never read
    w = torch.randn(n_total, width, generator=gen) * 100.0
    starts, o = [], 2
    for k in entries:
        starts.append(o)
        used = k - int(k * pad_frac * rng.random())
        idx[o:o + used] = torch.randperm(limit, generator=gen)[:used] if used <= limit else \
            torch.randint(0, limit, (used,), generator=gen)
        idx[o + used:o + k] = 0
        scale = 1 / d_in ** 0.5 if kind == "row" else 1 / k ** 0.5
        w[o:o + used] = torch.randn(used, width, generator=gen) * scale
        w[o + used:o + k] = 0.0
        o += k + rng.randrange(3)
    return idx, w.to(dtype), starts


def make_batch(kind: str, pattern: str, num_seqs: int, tokens_per_seq: int | tuple[int, int], *,
               entries: list[int] | None = None, num_adapters: int | None = None, base_frac: float = 0.15,
               d_in: int = 80, d_out: int = 72, dtype: torch.dtype = torch.float32, seed: int = 0) -> Batch:
    """Random batch: sequences assigned to resident adapters by popularity (a `base_frac` share on the
    base model), tokens grouped by adapter in shuffled segment order."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    entries = entries or MIXED_ENTRIES
    num_adapters = num_adapters or max(num_seqs, len(entries))
    adapter_k = [entries[a % len(entries)] for a in range(num_adapters)]
    idx, w, starts = make_pool(kind, adapter_k, d_in, d_out, dtype, rng, gen)
    seq_adapter = [(-1 if rng.random() < base_frac else a) for a in pick_adapters(pattern, num_seqs, num_adapters, rng)]
    seq_len = [tokens_per_seq if isinstance(tokens_per_seq, int) else rng.randint(*tokens_per_seq)
               for _ in range(num_seqs)]
    tokens: dict[int, int] = {}
    for a, n in zip(seq_adapter, seq_len):
        tokens[a] = tokens.get(a, 0) + n
    order = list(tokens)
    rng.shuffle(order)
    indptr, seg_start, seg_k = [0], [], []
    for a in order:
        indptr.append(indptr[-1] + tokens[a])
        seg_start.append(-1 if a < 0 else starts[a])
        seg_k.append(0 if a < 0 else adapter_k[a])
    T = indptr[-1]
    x = torch.randn(T, d_in, generator=gen).to(dtype)
    y = torch.randn(T, d_out, generator=gen).to(dtype)
    return Batch(kind, x, y, idx, w, make_lora_plan(indptr, seg_start, seg_k))


def assert_fast_matches_reference(b: Batch) -> None:
    fast, ref = OPS[b.kind]
    y_ref, y_fast = b.y.clone(), b.y.clone()
    ref(y_ref, b.x, b.idx, b.w, b.plan)
    fast(y_fast, b.x, b.idx, b.w, b.plan)
    # fp32: summation order only (1e-5); bf16: the fast op may round the delta to bf16 before adding (2e-2).
    torch.testing.assert_close(y_fast, y_ref, **tolerances(b.x.dtype, y_ref.float() - b.y.float()))


@DTYPES
@pytest.mark.parametrize("num_tokens", [1, 7, 32, 64])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("kind", KINDS)
def test_decode_batch_matches_reference_for_every_popularity_pattern(kind: str, pattern: str, num_tokens: int,
                                                                     dtype: torch.dtype) -> None:
    assert_fast_matches_reference(make_batch(kind, pattern, num_tokens, 1, dtype=dtype, seed=num_tokens))


@DTYPES
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("kind", KINDS)
def test_ragged_decode_with_1_to_4_tokens_per_seq_matches_reference(kind: str, pattern: str,
                                                                    dtype: torch.dtype) -> None:
    for seed in range(2):
        assert_fast_matches_reference(make_batch(kind, pattern, 24, (1, 4), dtype=dtype, seed=seed))


@DTYPES
@pytest.mark.parametrize("num_seqs,tokens", [(1, 7), (2, 16), (3, (10, 30)), (4, (40, 120))])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("kind", KINDS)
def test_prefill_batch_matches_reference_for_every_popularity_pattern(kind: str, pattern: str, num_seqs: int,
                                                                      tokens, dtype: torch.dtype) -> None:
    assert_fast_matches_reference(make_batch(kind, pattern, num_seqs, tokens, dtype=dtype, seed=num_seqs))


@pytest.mark.parametrize("kind", KINDS)
def test_every_plan_path_is_exercised_and_correct(kind: str) -> None:
    cases = {
        # one entry count, 1 token/seq, no base: x and y are plain slices, bags read all of h
        "batched_dense": make_batch(kind, "distinct", 32, 1, entries=[17], base_frac=0.0),
        # mixed entry counts, ragged lengths, base segments in the middle: every gather/index variant
        "batched_ragged": make_batch(kind, "zipf:1.5", 64, (1, 3), base_frac=0.3, seed=1),
        "single": make_batch(kind, "identical", 64, 1, base_frac=0.0),
        "loop": make_batch(kind, "distinct", 3, 40, base_frac=0.0),
        # one long (prefill-like) segment next to many decode tokens: the long one runs as a GEMM
        "loop+batched": make_batch(kind, "distinct", 12, 1, base_frac=0.0),
    }
    mixed = cases["loop+batched"]
    n_long = LONG_SEGMENT_TOKENS + 6
    indptr = [0, n_long] + [n_long + i + 1 for i in range(11)]
    mixed.plan = make_lora_plan(indptr, *_adapters_of(mixed))
    mixed.x = torch.randn(indptr[-1], mixed.x.shape[1])
    mixed.y = torch.randn(indptr[-1], mixed.y.shape[1])
    dense, ragged = cases["batched_dense"].plan, cases["batched_ragged"].plan
    assert dense.path == "batched" and dense.x_range and dense.y_range and dense.h_pos is None
    assert ragged.path == "batched" and ragged.x_idx is not None and ragged.y_idx is not None
    assert ragged.h_pos is not None and ragged.group_len > 1
    assert cases["single"].plan.path == "loop" and len(cases["single"].plan.loop_segs) == 1
    assert cases["loop"].plan.path == "loop" and len(cases["loop"].plan.loop_segs) == 3
    assert mixed.plan.path == "loop+batched" and len(mixed.plan.loop_segs) == 1
    for b in cases.values():
        assert_fast_matches_reference(b)


def _adapters_of(b: Batch) -> tuple[list[int], list[int]]:
    """(first entry, entry count) of 12 adapters of b's pool, cycling through the ones b's plan uses."""
    used = [(o, k) for o, k in zip(b.plan.seg_row_start, b.plan.seg_rank) if o >= 0]
    picked = [used[i % len(used)] for i in range(12)]
    return [o for o, _ in picked], [k for _, k in picked]


@pytest.mark.parametrize("path_case", ["loop", "batched"])
@pytest.mark.parametrize("kind", KINDS)
def test_single_adapter_equals_dense_delta_formula(kind: str, path_case: str) -> None:
    # y += x @ ΔW^T with ΔW built by s2ft_dense_delta, for an adapter with padding entries, in one
    # segment (loop path) or split over many segments between base segments (batched path).
    rng, gen = random.Random(7), torch.Generator().manual_seed(7)
    d_in, d_out, k = 96, 64, 46
    idx, w, (o,) = make_pool(kind, [k], d_in, d_out, torch.float32, rng, gen, pad_frac=0.5)
    assert int((idx[o:o + k] == 0).sum()) > 1  # padding entries present (several point at index 0)
    if path_case == "loop":
        indptr, starts, ks = [0, 9], [o], [k]
    else:
        indptr, starts, ks = list(range(0, 25, 2)), [o, -1] * 6, [k, 0] * 6
    plan = make_lora_plan(indptr, starts, ks)
    assert (plan.path == "loop") == (path_case == "loop")
    T = indptr[-1]
    x, y0 = torch.randn(T, d_in, generator=gen), torch.randn(T, d_out, generator=gen)
    delta_w = s2ft_dense_delta(idx[o:o + k], w[o:o + k], kind, d_out, d_in)
    assert delta_w.shape == (d_out, d_in)
    expected = y0.clone()
    for s, e, so in zip(indptr, indptr[1:], starts):
        if so >= 0:
            expected[s:e] += x[s:e] @ delta_w.T
    for op in OPS[kind]:
        y = y0.clone()
        op(y, x, idx, w, plan)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pattern,tokens", [("zipf:1.5", (1, 3)), ("identical", 1), ("distinct", 70)])
def test_strided_views_for_x_and_y_are_supported(kind: str, pattern: str, tokens) -> None:
    # the engine passes y[:, start:end] of a fused QKV output; x may be a column slice too
    b = make_batch(kind, pattern, 32 if tokens != 70 else 2, tokens, base_frac=0.1, seed=4)
    fast, ref = OPS[kind]
    x_view = torch.cat([torch.randn_like(b.x), b.x, torch.randn_like(b.x)], dim=1)[:, b.x.shape[1]:2 * b.x.shape[1]]
    w_out = b.y.shape[1]
    y_wide_ref = torch.cat([torch.randn_like(b.y), b.y, torch.randn_like(b.y)], dim=1)
    y_wide_fast = y_wide_ref.clone()
    ref(y_wide_ref[:, w_out:2 * w_out], b.x, b.idx, b.w, b.plan)
    fast(y_wide_fast[:, w_out:2 * w_out], x_view, b.idx, b.w, b.plan)
    torch.testing.assert_close(y_wide_fast, y_wide_ref, rtol=1e-5, atol=1e-5)  # neighbours untouched too
    yt_fast = b.y.clone().T.contiguous().T  # column-major y: stride (1, T)
    yt_ref = b.y.clone()
    ref(yt_ref, b.x, b.idx, b.w, b.plan)
    fast(yt_fast, b.x, b.idx, b.w, b.plan)
    torch.testing.assert_close(yt_fast, yt_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_only_adapter_leaves_y_bit_identical(kind: str) -> None:
    # every entry of adapter 1 is padding (index 0, zero weights): it must contribute exactly nothing
    d_in, d_out = 40, 24
    width = d_out if kind == "col" else d_in
    idx = torch.tensor([3, 5, 0, 0, 0, 0], dtype=torch.long)
    w = torch.zeros(6, width)
    w[:2] = torch.randn(2, width)
    x = torch.randn(20, d_in)
    y0 = torch.randn(20, d_out)
    for indptr, starts, ks in [([0, 20], [2], [4]), (list(range(21)), [2] * 20, [4] * 20)]:
        plan = make_lora_plan(indptr, starts, ks)
        for op in OPS[kind]:
            y = y0.clone()
            op(y, x, idx, w, plan)
            assert torch.equal(y, y0), (op.__name__, plan.path)


def test_repeated_row_indices_accumulate_instead_of_overwriting() -> None:
    # entries 0 and 1 both target output row 2: their contributions add up
    x = torch.randn(6, 5)
    row_idx = torch.tensor([2, 2, 4, 0], dtype=torch.long)
    row_w = torch.randn(4, 5)
    y0 = torch.randn(6, 7)
    expected = y0.clone()
    expected[:, 2] += x @ row_w[0] + x @ row_w[1]
    expected[:, 4] += x @ row_w[2]
    expected[:, 0] += x @ row_w[3]
    for indptr in ([0, 6], list(range(7))):  # loop path, batched path
        plan = make_lora_plan(indptr, [0] * (len(indptr) - 1), [4] * (len(indptr) - 1))
        for op in (s2ft_row, s2ft_row_reference):
            y = y0.clone()
            op(y, x, row_idx, row_w, plan)
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_repeated_column_indices_add_their_deltas() -> None:
    x = torch.randn(6, 5)
    col_idx = torch.tensor([1, 1, 3], dtype=torch.long)
    col_w = torch.randn(3, 4)
    y0 = torch.randn(6, 4)
    expected = y0 + x[:, 1:2] * (col_w[0] + col_w[1]) + x[:, 3:4] * col_w[2]
    for indptr in ([0, 6], list(range(7))):
        plan = make_lora_plan(indptr, [0] * (len(indptr) - 1), [3] * (len(indptr) - 1))
        for op in (s2ft_col, s2ft_col_reference):
            y = y0.clone()
            op(y, x, col_idx, col_w, plan)
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_delta_is_accumulated_into_existing_y_in_place(kind: str) -> None:
    # hand-computed: segment 0 base, segment 1 (tokens 2..4) uses entries 1..2, segment 2 (token 5) entry 0
    gen = torch.Generator().manual_seed(0)
    d_in, d_out = 5, 3
    x, y0 = torch.randn(6, d_in, generator=gen), torch.randn(6, d_out, generator=gen)
    if kind == "col":
        idx, w = torch.tensor([4, 0, 2, 1]), torch.randn(4, d_out, generator=gen)
        expected = y0.clone()
        expected[2:5] += x[2:5, [0, 2]] @ w[1:3]
        expected[5:6] += x[5:6, [4]] @ w[0:1]
    else:
        idx, w = torch.tensor([1, 2, 0, 1]), torch.randn(4, d_in, generator=gen)
        expected = y0.clone()
        expected[2:5, 2] += x[2:5] @ w[1]
        expected[2:5, 0] += x[2:5] @ w[2]
        expected[5, 1] += x[5] @ w[0]
    for indptr, starts, ks in [([0, 2, 5, 6], [-1, 1, 0], [0, 2, 1]),  # loop path
                               ([0, 2, 3, 4, 5, 6], [-1, 1, 1, 1, 0], [0, 2, 2, 2, 1])]:  # batched path
        plan = make_lora_plan(indptr, starts, ks)
        for op in OPS[kind]:
            y = y0.clone()
            ptr = y.data_ptr()
            op(y, x, idx, w, plan)
            assert y.data_ptr() == ptr
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_all_base_plan_leaves_y_unchanged(kind: str) -> None:
    plan = make_lora_plan([0, 3, 5, 9], [-1, -1, -1], [0, 8, 16])
    assert plan.path == "none"
    x, y = torch.randn(9, 16), torch.randn(9, 12)
    y0 = y.clone()
    w = torch.randn(32, 12 if kind == "col" else 16)
    for op in OPS[kind]:
        op(y, x, torch.zeros(32, dtype=torch.long), w, plan)
        assert torch.equal(y, y0)


def test_dense_delta_places_columns_and_rows() -> None:
    w_col = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])  # 3 entries, d_out = 2; last is padding
    d = s2ft_dense_delta(torch.tensor([2, 0, 0]), w_col, "col", d_out=2, d_in=4)
    torch.testing.assert_close(d, torch.tensor([[3.0, 0, 1, 0], [4, 0, 2, 0]]))
    w_row = torch.tensor([[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]])  # 2 entries, d_in = 3, both on row 1
    d = s2ft_dense_delta(torch.tensor([1, 1]), w_row, "row", d_out=2, d_in=3)
    torch.testing.assert_close(d, torch.tensor([[0.0, 0, 0], [6, 8, 10]]))
    with pytest.raises(ValueError):
        s2ft_dense_delta(torch.tensor([0]), w_row[:1], "diag", 2, 3)
    with pytest.raises(ValueError):
        s2ft_dense_delta(torch.tensor([5]), w_col[:1], "col", d_out=2, d_in=4)  # column 5 of 4


@pytest.mark.parametrize("kind", KINDS)
def test_mismatched_shapes_and_out_of_range_indices_are_rejected(kind: str) -> None:
    plan = make_lora_plan([0, 4], [0], [3])
    x, y = torch.randn(4, 6), torch.randn(4, 5)
    width, limit = (5, 6) if kind == "col" else (6, 5)
    fast, ref = OPS[kind]
    for op in (fast, ref):
        with pytest.raises(ValueError):  # pool narrower than the plan needs
            op(y, x, torch.zeros(2, dtype=torch.long), torch.zeros(2, width), plan)
        with pytest.raises(ValueError):  # weight width of the wrong space
            op(y, x, torch.zeros(3, dtype=torch.long), torch.zeros(3, width + 1), plan)
        with pytest.raises(ValueError):  # x rows != plan tokens
            op(y, x[:3], torch.zeros(3, dtype=torch.long), torch.zeros(3, width), plan)
    with pytest.raises(ValueError):  # the reference validates index values
        ref(y, x, torch.tensor([0, limit, 1]), torch.zeros(3, width), plan)
