"""Triton kernels (kernels/triton) must equal the torch references, run on CPU under TRITON_INTERPRET=1.

The interpreter executes every program in Python, so shapes stay tiny; d_in/d_out are not powers of
two and segments are shorter and longer than the tiles so that every mask is exercised.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kernels import (make_lora_plan, s2ft_col, s2ft_col_reference, s2ft_dense_delta, s2ft_row,  # noqa: E402
                     s2ft_row_reference, sgmv_lora, sgmv_lora_reference)
from kernels.dispatch import select_kernels  # noqa: E402
from kernels.triton import experts as triton_experts  # noqa: E402
from kernels.triton import lora as triton_lora  # noqa: E402
from kernels.triton.s2ft import s2ft_col_triton, s2ft_row_triton  # noqa: E402
from tests import test_kernels as lora_cases  # noqa: E402
from tests import test_kernels_s2ft as s2ft_cases  # noqa: E402
from tests.test_kernels import PATTERNS, tolerances  # noqa: E402

if not triton_lora.INTERPRET:
    pytest.skip("kernels.triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

RANKS = [2, 4, 8, 16, 5]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
ALL_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
# (num_seqs, tokens per seq): decode-like plans take BGMV, ragged prefill-like ones SGMV.
SHAPES = {"single": (1, 1), "decode": (24, 1), "prefill": (5, (1, 14))}


def assert_close(y: torch.Tensor, y_ref: torch.Tensor, y0: torch.Tensor) -> None:
    torch.testing.assert_close(y, y_ref, **tolerances(y_ref.dtype, y_ref.float() - y0.float()))


def check_lora(b: lora_cases.Batch) -> None:
    y_ref, y_tri = b.y.clone(), b.y.clone()
    sgmv_lora_reference(y_ref, b.x, b.lora_a, b.lora_b, b.plan)
    triton_lora.sgmv_lora_triton(y_tri, b.x, b.lora_a, b.lora_b, b.plan)
    assert_close(y_tri, y_ref, b.y)


# ---------------------------------------------------------------------------------------------- LoRA


@ALL_DTYPES
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("pattern", PATTERNS)
def test_sgmv_lora_triton_matches_reference(pattern: str, shape: str, dtype: torch.dtype) -> None:
    num_seqs, tokens = SHAPES[shape]
    b = lora_cases.make_batch(pattern, num_seqs, tokens, ranks=RANKS, base_frac=0.2, d_in=40, d_out=72,
                              dtype=dtype, seed=len(pattern))
    assert 1 <= b.x.shape[0] <= 40
    check_lora(b)
    if b.plan.path == "none":
        return  # the lone sequence drew the base model
    bgmv = b.plan.triton_meta.max_seg_len <= triton_lora.BGMV_MAX_SEG_LEN
    if shape == "prefill" or pattern == "identical":
        assert not bgmv
    elif pattern == "distinct":
        assert bgmv


@DTYPES
def test_bgmv_and_sgmv_agree_on_the_same_plan_with_ranks_above_one_tile(dtype: torch.dtype) -> None:
    # rank 80 > the 64-row SGMV shrink tile and > one expand rank chunk; rank 3 < every tile
    b = lora_cases.make_batch("uniform", 6, (1, 21), ranks=[80, 3, 16], base_frac=0.2, d_in=33, d_out=50,
                              dtype=dtype, seed=5)
    y_ref = b.y.clone()
    sgmv_lora_reference(y_ref, b.x, b.lora_a, b.lora_b, b.plan)
    meta = triton_lora.plan_meta(b.plan, b.x.device)
    for path in ("sgmv", "bgmv"):
        v = torch.zeros(b.x.shape[0], meta.max_rank)
        y = b.y.clone()
        if path == "sgmv":
            triton_lora.sgmv_shrink(b.x, b.lora_a, meta, v)
            triton_lora.sgmv_expand(y, v, b.lora_b, meta)
        else:
            triton_lora.bgmv_shrink(b.x, b.lora_a, meta.tok_row, meta.tok_rank, meta.max_rank, v)
            triton_lora.bgmv_expand(y, v, b.lora_b, meta.tok_row, meta.tok_rank, meta.max_rank)
        assert_close(y, y_ref, b.y)


@pytest.mark.parametrize("tokens", [1, 17], ids=["bgmv", "sgmv"])
def test_empty_segments_base_segments_and_rank_zero_are_skipped(tokens: int) -> None:
    # segments: empty LoRA, base, LoRA, empty base, rank-0 LoRA, LoRA at pool row 0
    n = [0, 3, tokens, 0, 2, tokens]
    indptr = [0]
    for c in n:
        indptr.append(indptr[-1] + c)
    plan = make_lora_plan(indptr, [4, -1, 9, -1, 2, 0], [8, 0, 5, 0, 0, 4])
    gen = torch.Generator().manual_seed(1)
    T = indptr[-1]
    x, y0 = torch.randn(T, 37, generator=gen), torch.randn(T, 45, generator=gen)
    a, bt = torch.randn(20, 37, generator=gen), torch.randn(20, 45, generator=gen)
    y_ref, y_tri = y0.clone(), y0.clone()
    sgmv_lora_reference(y_ref, x, a, bt, plan)
    triton_lora.sgmv_lora_triton(y_tri, x, a, bt, plan)
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-5, atol=1e-5)
    base = slice(indptr[1], indptr[2])
    assert torch.equal(y_tri[base], y0[base])
    meta = plan.triton_meta
    assert meta.num_segs == 2 and meta.tok_row[base].eq(-1).all()


def test_all_base_plan_leaves_y_unchanged() -> None:
    plan = make_lora_plan([0, 3, 5], [-1, -1], [0, 8])
    y = torch.randn(5, 12)
    y0 = y.clone()
    triton_lora.sgmv_lora_triton(y, torch.randn(5, 16), torch.randn(32, 16), torch.randn(32, 12), plan)
    assert torch.equal(y, y0)


@pytest.mark.parametrize("pattern,tokens", [("zipf:1.5", 1), ("identical", 9)], ids=["bgmv", "sgmv"])
def test_strided_views_for_x_and_y(pattern: str, tokens: int) -> None:
    # the engine passes y[:, start:end] of a fused QKV output
    b = lora_cases.make_batch(pattern, 12 if tokens == 1 else 3, tokens, ranks=RANKS, base_frac=0.2, seed=3)
    x_view = torch.cat([b.x, torch.randn_like(b.x)], dim=1)[:, : b.x.shape[1]]
    w = b.y.shape[1]
    y_ref = torch.cat([torch.zeros_like(b.y), b.y, torch.ones_like(b.y)], dim=1)
    y_tri = y_ref.clone()
    sgmv_lora_reference(y_ref[:, w:2 * w], b.x, b.lora_a, b.lora_b, b.plan)
    triton_lora.sgmv_lora_triton(y_tri[:, w:2 * w], x_view, b.lora_a, b.lora_b, b.plan)
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-5, atol=1e-5)


def test_plan_metadata_is_built_once_and_reused_across_module_widths() -> None:
    b = lora_cases.make_batch("uniform", 10, (1, 3), ranks=RANKS, seed=2)
    check_lora(b)
    meta = b.plan.triton_meta
    assert isinstance(meta, triton_lora.PlanMeta)
    for d_out in (24, 61):
        lb = torch.randn(b.lora_a.shape[0], d_out)
        check_lora(lora_cases.Batch(b.x, torch.randn(b.x.shape[0], d_out), b.lora_a, lb, b.plan))
        assert b.plan.triton_meta is meta


def test_shape_mismatch_with_plan_raises() -> None:
    plan = make_lora_plan([0, 4], [0], [4])
    with pytest.raises(ValueError):
        triton_lora.sgmv_lora_triton(torch.zeros(5, 8), torch.zeros(5, 8), torch.zeros(4, 8), torch.zeros(4, 8), plan)


# ---------------------------------------------------------------------------------------------- S²FT

S2FT_OPS = {"col": (s2ft_col_triton, s2ft_col_reference), "row": (s2ft_row_triton, s2ft_row_reference)}


def check_s2ft(b: s2ft_cases.Batch) -> None:
    tri, ref = S2FT_OPS[b.kind]
    y_ref, y_tri = b.y.clone(), b.y.clone()
    ref(y_ref, b.x, b.idx, b.w, b.plan)
    tri(y_tri, b.x, b.idx, b.w, b.plan)
    assert_close(y_tri, y_ref, b.y)


@ALL_DTYPES
@pytest.mark.parametrize("shape", ["decode", "prefill"])
@pytest.mark.parametrize("pattern", ["distinct", "zipf:1.5", "identical"])
@pytest.mark.parametrize("kind", ["col", "row"])
def test_s2ft_triton_matches_reference(kind: str, pattern: str, shape: str, dtype: torch.dtype) -> None:
    num_seqs, tokens = SHAPES[shape]
    # 40 entries > the 32-entry chunk; make_pool pads each adapter with index-0, zero-weight entries
    b = s2ft_cases.make_batch(kind, pattern, num_seqs // 2, tokens, entries=[3, 17, 40, 6], base_frac=0.2,
                              d_in=44, d_out=38, dtype=dtype, seed=7)
    check_s2ft(b)


@DTYPES
@pytest.mark.parametrize("tokens", [1, 18], ids=["bgmv", "sgmv"])
@pytest.mark.parametrize("kind", ["col", "row"])
def test_s2ft_repeated_indices_accumulate(kind: str, tokens: int, dtype: torch.dtype) -> None:
    # one adapter whose 70 entries hit 3 indices, repeats inside one 32-entry chunk and across chunks,
    # plus zero-weight padding at index 0 next to a real index-0 entry
    d_in, d_out = 30, 26
    gen = torch.Generator().manual_seed(11)
    idx = torch.tensor([5, 0, 5, 7] * 15 + [0] * 10)
    width = d_out if kind == "col" else d_in
    w = torch.randn(idx.numel(), width, generator=gen) / 8
    w[60:] = 0.0
    w = w.to(dtype)
    plan = make_lora_plan([0, 2, 2 + tokens], [-1, 0], [0, idx.numel()])
    x = torch.randn(2 + tokens, d_in, generator=gen).to(dtype)
    y0 = torch.randn(2 + tokens, d_out, generator=gen).to(dtype)
    b = s2ft_cases.Batch(kind, x, y0, idx, w, plan)
    check_s2ft(b)
    y_tri = y0.clone()
    S2FT_OPS[kind][0](y_tri, x, idx, w, plan)
    dense = s2ft_dense_delta(idx, w.float(), kind, d_out, d_in)
    expected = y0.float()
    expected[2:] += x[2:].float() @ dense.T
    assert_close(y_tri, expected.to(dtype), y0)


# --------------------------------------------------------------------------------------- routed experts


@DTYPES
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_routed_experts_top2_rows_match_reference_and_segmented_op(weighted: bool, dtype: torch.dtype) -> None:
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    n_tok, top_k, d_in, d_out = 9, 2, 36, 52
    expert_rank = [4, 8, 16, 5]
    starts, o = [], 2
    for r in expert_rank:
        starts.append(o)
        o += r + 1
    lora_a = (torch.randn(o + 2, d_in, generator=gen) / d_in ** 0.5).to(dtype)
    lora_b = torch.randn(o + 2, d_out, generator=gen).to(dtype)
    # each token picks 2 distinct experts; rows sorted by expert as in DecoderLayer._routed_experts
    experts = torch.tensor([rng.sample(range(len(expert_rank)), top_k) for _ in range(n_tok)])
    probs = torch.softmax(torch.randn(n_tok, top_k, generator=gen), dim=-1)
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    rows = torch.arange(n_tok).repeat_interleave(top_k)[order]
    h = torch.randn(n_tok, d_in, generator=gen).to(dtype)
    x = h[rows]
    e_sorted = flat[order]
    row_start = torch.tensor(starts)[e_sorted]
    rank = torch.tensor(expert_rank)[e_sorted]
    row_start[3] = -1  # a row without a delta
    weight = probs.reshape(-1)[order].to(dtype) if weighted else None
    y0 = torch.randn(x.shape[0], d_out, generator=gen).to(dtype)
    y_ref, y_tri = y0.clone(), y0.clone()
    triton_experts.routed_lora_reference(y_ref, x, lora_a, lora_b, row_start, rank, weight)
    triton_experts.routed_lora_triton(y_tri, x, lora_a, lora_b, row_start, rank, weight, max_rank=16)
    assert_close(y_tri, y_ref, y0)
    if not weighted:  # per-row semantics == the segmented op with one segment per row
        plan = make_lora_plan(list(range(x.shape[0] + 1)), row_start.tolist(), rank.tolist())
        y_seg = y0.clone()
        sgmv_lora_reference(y_seg, x, lora_a, lora_b, plan)
        assert_close(y_tri, y_seg, y0)


# ------------------------------------------------------------------------------------------- dispatch


def test_select_kernels_picks_torch_ops_on_cpu_and_triton_on_cuda() -> None:
    ks = select_kernels(torch.device("cpu"))
    assert ks.name == "torch-cpu"
    assert (ks.sgmv_lora, ks.s2ft_col, ks.s2ft_row) == (sgmv_lora, s2ft_col, s2ft_row)
    cuda = select_kernels("cuda")  # selection only: nothing is launched
    assert cuda.name == "triton" and cuda.sgmv_lora is triton_lora.sgmv_lora_triton
    assert cuda.s2ft_col is s2ft_col_triton and cuda.s2ft_row is s2ft_row_triton
    with pytest.raises(Exception):
        ks.name = "x"  # frozen


def test_kernels_import_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now raises ImportError
        "import kernels, kernels.dispatch, kernels.triton as kt\n"
        "assert not kt.available()\n"
        "assert kernels.dispatch.select_kernels('cpu').name == 'torch-cpu'\n"
        "assert kernels.dispatch.select_kernels('cuda').name == 'torch'\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=120)


# ------------------------------------------------------------------------------- GPU compile (no GPU)

# Compiles every kernel down to an sm_90 cubin (the triton wheel bundles ptxas), for the first and
# last autotune config, so code that only the GPU compiler sees (layouts, MMA, barriers, split-K
# atomics) is checked here too. Runs without TRITON_INTERPRET, in a subprocess.
AOT_CHECK = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.triton import lora as L, s2ft as S
assert not L.INTERPRET
extra = {
    L._sgmv_shrink_kernel: dict(BLOCK_R=16, PRECISION="tf32"),
    L._sgmv_expand_kernel: dict(BLOCK_R=16, PRECISION="tf32"),
    L._bgmv_shrink_kernel: dict(BLOCK_R=16),
    L._bgmv_expand_kernel: dict(BLOCK_R=16, HAS_WEIGHT=True),
    S._s2ft_col_kernel: dict(PRECISION="tf32"),
    S._s2ft_row_scatter_kernel: dict(),
}
types = {"v_ptr": "*fp32", "h_ptr": "*fp32", "idx_ptr": "*i64"}
for kern, consts in extra.items():
    fn = kern.fn
    for cfg in (kern.configs[0], kern.configs[-1]):
        c = {**consts, **cfg.kwargs}
        sig = {n: "constexpr" if n in c else types.get(n, ("*i32" if n.startswith(("seg_", "tok_")) else "*bf16")
                                                     if n.endswith("_ptr") else "i32") for n in fn.arg_names}
        try:
            out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=c), target=GPUTarget("cuda", 90, 32),
                                 options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        except Exception as e:
            if "ptxas" in str(e).lower() and "not found" in str(e).lower():
                sys.exit(77)
            raise
        assert out.asm["cubin"], fn.__name__
"""


def test_kernels_compile_for_sm90_without_a_gpu() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", AOT_CHECK], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    if r.returncode == 77:
        pytest.skip("triton's ptxas is not available")
    assert r.returncode == 0, r.stderr[-4000:]


def test_bgmv_autotune_prunes_tiles_that_would_spill_for_large_ranks() -> None:
    import triton

    cfgs = [triton.Config({"BLOCK_K": bk}) for bk in (128, 256, 512)]
    prune = triton_lora.prune_rank_tile("BLOCK_K")["early_config_prune"]
    assert [c.kwargs["BLOCK_K"] for c in prune(cfgs, {"max_rank": 16})] == [128, 256, 512]
    assert [c.kwargs["BLOCK_K"] for c in prune(cfgs, {"max_rank": 64})] == [128]
    assert [c.kwargs["BLOCK_K"] for c in prune(cfgs, {"max_rank": 256})] == [128]  # nothing fits: the smallest
