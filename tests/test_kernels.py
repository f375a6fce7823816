"""sgmv_lora (fast) must equal sgmv_lora_reference on every adapter-popularity pattern."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from kernels import LoraPlan, make_lora_plan, sgmv_lora, sgmv_lora_reference
from kernels.lora_plan import LONG_SEGMENT_TOKENS

MIXED_RANKS = [4, 8, 16, 64]
PATTERNS = ["distinct", "uniform", "zipf:1.5", "identical", "skewed"]


@pytest.fixture(autouse=True, params=["cpp", "aten"])
def cpu_path(request, monkeypatch):
    """Every test here runs twice on the CPU: through the C++ LoRA op (kernels.cpu_lora) and through
    the ATen path that serves where it cannot be built."""
    from kernels import cpu_lora

    if request.param == "aten":
        monkeypatch.setitem(cpu_lora._state, "op", None)
    elif cpu_lora.get() is None:
        pytest.skip("the C++ LoRA op could not be built here (tests/test_lora_dtype.py checks that it builds wherever a compiler is)")
    return request.param


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    plan: LoraPlan


def pick_adapters(pattern: str, num_seqs: int, num_adapters: int, rng: random.Random) -> list[int]:
    """Adapter id per sequence for a popularity pattern."""
    if pattern == "distinct":
        return [i % num_adapters for i in range(num_seqs)]
    if pattern == "identical":
        return [0] * num_seqs
    if pattern == "uniform":
        return [rng.randrange(num_adapters) for _ in range(num_seqs)]
    if pattern.startswith("zipf:"):
        a = float(pattern.split(":")[1])
        return rng.choices(range(num_adapters), weights=[1 / (k + 1) ** a for k in range(num_adapters)], k=num_seqs)
    if pattern == "skewed":  # one hot adapter + a uniform tail
        return [0 if rng.random() < 0.6 else rng.randrange(1, num_adapters) for _ in range(num_seqs)]
    raise ValueError(pattern)


def make_batch(pattern: str, num_seqs: int, tokens_per_seq: int | tuple[int, int], *, ranks: list[int] | None = None,
               num_adapters: int | None = None, base_frac: float = 0.15, d_in: int = 48, d_out: int = 40,
               dtype: torch.dtype = torch.float32, seed: int = 0) -> Batch:
    """Random batch: resident adapters (ranks cycle through `ranks`) packed into row pools with gaps,
    sequences assigned by popularity (a `base_frac` share on the base model), tokens ordered by adapter."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    ranks = ranks or MIXED_RANKS
    num_adapters = num_adapters or max(num_seqs, len(ranks))
    adapter_rank = [ranks[k % len(ranks)] for k in range(num_adapters)]
    row_start, n_rows = [], 3  # leading/trailing gap rows: offsets must be honoured
    for r in adapter_rank:
        row_start.append(n_rows)
        n_rows += r + rng.randrange(3)
    n_rows += 2
    seq_adapter = [(-1 if rng.random() < base_frac else k) for k in pick_adapters(pattern, num_seqs, num_adapters, rng)]
    seq_len = [tokens_per_seq if isinstance(tokens_per_seq, int) else rng.randint(*tokens_per_seq)
               for _ in range(num_seqs)]
    tokens: dict[int, int] = {}
    for k, n in zip(seq_adapter, seq_len):
        tokens[k] = tokens.get(k, 0) + n
    order = list(tokens)
    rng.shuffle(order)  # the engine groups by adapter but need not sort; base may sit in the middle
    indptr, starts, seg_ranks = [0], [], []
    for k in order:
        indptr.append(indptr[-1] + tokens[k])
        starts.append(-1 if k < 0 else row_start[k])
        seg_ranks.append(0 if k < 0 else adapter_rank[k])
    T = indptr[-1]
    x = torch.randn(T, d_in, generator=gen).to(dtype)
    lora_a = (torch.randn(n_rows, d_in, generator=gen) / d_in ** 0.5).to(dtype)
    lora_b = (torch.randn(n_rows, d_out, generator=gen) * 0.5).to(dtype)
    y = torch.randn(T, d_out, generator=gen).to(dtype)
    return Batch(x, y, lora_a, lora_b, make_lora_plan(indptr, starts, seg_ranks))


def tolerances(dtype: torch.dtype, delta: torch.Tensor) -> dict[str, float]:
    # fp32: only summation order differs -> 1e-5 relative (of the element, or of the largest delta).
    # bf16 (8-bit mantissa, ulp 2^-8 = 3.9e-3): the reference rounds once (into y); the fast op may also
    # round h and the delta to bf16 (and compute in bf16 where the CPU has native bf16 GEMMs) -> 2e-2,
    # relative to the element or to the largest delta (where y and the delta cancel).
    scale = float(delta.abs().max()) if delta.numel() else 1.0
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5 * max(scale, 1.0))
    return dict(rtol=2e-2, atol=2e-2 * max(scale, 1.0))


def assert_fast_matches_reference(b: Batch) -> None:
    y_ref, y_fast = b.y.clone(), b.y.clone()
    sgmv_lora_reference(y_ref, b.x, b.lora_a, b.lora_b, b.plan)
    sgmv_lora(y_fast, b.x, b.lora_a, b.lora_b, b.plan)
    torch.testing.assert_close(y_fast, y_ref, **tolerances(b.x.dtype, y_ref.float() - b.y.float()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_tokens", [1, 7, 32, 64])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_decode_batch_matches_reference_for_every_popularity_pattern(pattern: str, num_tokens: int,
                                                                     dtype: torch.dtype) -> None:
    assert_fast_matches_reference(make_batch(pattern, num_tokens, 1, dtype=dtype, seed=num_tokens))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_ragged_decode_with_1_to_4_tokens_per_seq_matches_reference(pattern: str, dtype: torch.dtype) -> None:
    for seed in range(3):
        assert_fast_matches_reference(make_batch(pattern, 24, (1, 4), dtype=dtype, seed=seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_seqs,tokens", [(1, 7), (2, 16), (3, (10, 30)), (4, (40, 120))])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_prefill_batch_matches_reference_for_every_popularity_pattern(pattern: str, num_seqs: int, tokens,
                                                                      dtype: torch.dtype) -> None:
    assert_fast_matches_reference(make_batch(pattern, num_seqs, tokens, dtype=dtype, seed=num_seqs))


def test_every_plan_path_is_exercised_and_correct() -> None:
    cases = {
        # uniform rank, 1 token/seq, no base: x and y are plain slices, bags read all of h
        "batched_dense": make_batch("distinct", 32, 1, ranks=[16], base_frac=0.0),
        # mixed ranks, ragged lengths, base segments in the middle: every gather/index variant
        "batched_ragged": make_batch("zipf:1.5", 64, (1, 3), base_frac=0.3, seed=1),
        "single": make_batch("identical", 64, 1, base_frac=0.0),
        "loop": make_batch("distinct", 3, 40, base_frac=0.0),
        "loop+batched": make_batch("distinct", 12, 1, base_frac=0.0),
    }
    dense, ragged = cases["batched_dense"].plan, cases["batched_ragged"].plan
    assert dense.path == "batched" and dense.x_range and dense.y_range and dense.h_pos is None
    assert ragged.path == "batched" and ragged.x_idx is not None and ragged.y_idx is not None
    assert ragged.h_pos is not None and ragged.group_len > 1
    assert cases["single"].plan.path == "loop" and len(cases["single"].plan.loop_segs) == 1
    assert cases["loop"].plan.path == "loop" and len(cases["loop"].plan.loop_segs) == 3
    # one long (prefill-like) segment next to many decode tokens: the long one runs as a GEMM
    mixed = cases["loop+batched"]
    n_long = LONG_SEGMENT_TOKENS + 6
    indptr = [0, n_long] + [n_long + i + 1 for i in range(11)]
    mixed.plan = make_lora_plan(indptr, [16 * i for i in range(12)], [16] * 12)
    mixed.x = torch.randn(indptr[-1], mixed.x.shape[1])
    mixed.y = torch.randn(indptr[-1], mixed.y.shape[1])
    mixed.lora_a, mixed.lora_b = torch.randn(12 * 16, mixed.x.shape[1]), torch.randn(12 * 16, mixed.y.shape[1])
    assert mixed.plan.path == "loop+batched" and mixed.plan.loop_segs == ((0, n_long, 0, 16),)
    for b in cases.values():
        assert_fast_matches_reference(b)


def test_hot_adapter_segment_is_split_into_groups_and_stays_correct() -> None:
    # one 40-token segment + 20 single-token segments: padding all groups to 40 slots would waste
    # 800 slots, so the plan chunks the hot segment.
    indptr = [0, 40] + [41 + i for i in range(20)]
    starts, ranks = [16 * i for i in range(21)], [16] * 21
    plan = make_lora_plan(indptr, starts, ranks)
    assert plan.path == "batched" and plan.group_len < 40 and plan.num_groups > 21
    gen = torch.Generator().manual_seed(0)
    b = Batch(torch.randn(60, 32, generator=gen), torch.randn(60, 24, generator=gen),
              torch.randn(21 * 16, 32, generator=gen), torch.randn(21 * 16, 24, generator=gen), plan)
    assert_fast_matches_reference(b)


def test_all_base_plan_leaves_y_unchanged() -> None:
    plan = make_lora_plan([0, 3, 5, 9], [-1, -1, -1], [0, 8, 16])
    assert plan.path == "none"
    x, y = torch.randn(9, 16), torch.randn(9, 12)
    y0 = y.clone()
    for op in (sgmv_lora, sgmv_lora_reference):
        op(y, x, torch.randn(32, 16), torch.randn(32, 12), plan)
        assert torch.equal(y, y0)


def test_delta_is_accumulated_into_existing_y_in_place() -> None:
    # hand-computed: segment 0 base, segment 1 (tokens 2..4) uses rows 1..2, segment 2 (token 5) row 0
    plan = make_lora_plan([0, 2, 5, 6], [-1, 1, 0], [0, 2, 1])
    gen = torch.Generator().manual_seed(0)
    x, a, bt = torch.randn(6, 5, generator=gen), torch.randn(4, 5, generator=gen), torch.randn(4, 3, generator=gen)
    y0 = torch.randn(6, 3, generator=gen)
    expected = y0.clone()
    expected[2:5] += x[2:5] @ a[1:3].T @ bt[1:3]
    expected[5:6] += x[5:6] @ a[0:1].T @ bt[0:1]
    for op in (sgmv_lora, sgmv_lora_reference):
        y = y0.clone()
        ptr = y.data_ptr()
        op(y, x, a, bt, plan)
        assert y.data_ptr() == ptr
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern,tokens", [("zipf:1.5", (1, 3)), ("identical", 1), ("distinct", 70)])
def test_strided_views_for_x_and_y_are_supported(pattern: str, tokens) -> None:
    # the engine passes y[:, start:end] of a fused QKV output
    b = make_batch(pattern, 32 if tokens != 70 else 2, tokens, base_frac=0.0, seed=4)
    x_wide = torch.cat([b.x, torch.randn_like(b.x)], dim=1)
    x_view = x_wide[:, : b.x.shape[1]]  # non-contiguous rows
    y_wide_ref = torch.cat([torch.zeros_like(b.y), b.y], dim=1)
    y_wide_fast = y_wide_ref.clone()
    sgmv_lora_reference(y_wide_ref[:, b.y.shape[1]:], b.x, b.lora_a, b.lora_b, b.plan)
    sgmv_lora(y_wide_fast[:, b.y.shape[1]:], x_view, b.lora_a, b.lora_b, b.plan)
    torch.testing.assert_close(y_wide_fast, y_wide_ref, rtol=1e-5, atol=1e-5)


def test_plan_is_reused_across_modules_with_different_widths() -> None:
    b = make_batch("uniform", 16, (1, 2), seed=2)
    for d_out in (8, 40, 96):
        lb = torch.randn(b.lora_a.shape[0], d_out)
        y = torch.randn(b.x.shape[0], d_out)
        assert_fast_matches_reference(Batch(b.x, y, b.lora_a, lb, b.plan))


@pytest.mark.parametrize("indptr,starts,ranks", [
    ([0, 2], [0, 1], [4]),          # length mismatch
    ([1, 2], [0], [4]),             # indptr must start at 0
    ([0, 3, 2], [0, 4], [4, 4]),    # decreasing indptr
    ([0, 2], [-2], [4]),            # row_start below -1
])
def test_make_lora_plan_rejects_inconsistent_metadata(indptr, starts, ranks) -> None:
    with pytest.raises(ValueError):
        make_lora_plan(indptr, starts, ranks)


def test_shape_mismatch_with_plan_raises() -> None:
    plan = make_lora_plan([0, 4], [0], [4])
    with pytest.raises(ValueError):
        sgmv_lora(torch.zeros(5, 8), torch.zeros(5, 8), torch.zeros(4, 8), torch.zeros(4, 8), plan)


def test_pool_too_small_for_plan_rows_raises() -> None:
    plan = make_lora_plan([0, 4], [8], [16])  # needs rows 8..23
    with pytest.raises(ValueError):
        sgmv_lora(torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(20, 8), torch.zeros(20, 8), plan)



@pytest.mark.parametrize("rows", [1, 33, 70])
def test_cpu_op_chunks_long_segments_and_skips_padding(rows, cpu_path):
    """Segments of any length (in chunks of 32 tokens inside the op) and (0, 0, 0, 0) padding rows."""
    from kernels import cpu_lora

    op = cpu_lora.get()
    if op is None or cpu_path == "aten":
        pytest.skip("the C++ op itself")
    g = torch.Generator().manual_seed(rows)
    x, a, b = torch.randn(rows + 3, 24, generator=g), torch.randn(40, 24, generator=g), torch.randn(40, 56, generator=g)
    y0 = torch.randn(rows + 3, 80, generator=g)
    seg = torch.tensor([[0, 0, 0, 0], [2, 2 + rows, 5, 7], [0, 0, 0, 0], [2 + rows, 3 + rows, 12, 16]])
    y = y0.clone()
    op(y[:, 10:66], x, a, b, seg)  # a strided output slice, as a fused projection's
    ref = y0.clone()
    plan = make_lora_plan([0, 2, 2 + rows, 3 + rows, rows + 3], [-1, 5, 12, -1], [0, 7, 16, 0])
    sgmv_lora_reference(ref[:, 10:66], x, a, b, plan)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for bad in ([[0, rows + 4, 0, 1]], [[0, 1, 39, 2]], [[0, 1, 0, 257]], [[1, 0, 0, 1]]):
        with pytest.raises(RuntimeError, match="out of range"):
            op(y[:, 10:66], x, a, b, torch.tensor(bad))
