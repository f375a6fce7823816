"""Triton kernels (kernels/triton) must equal the torch references, run on CPU under TRITON_INTERPRET=1.

The interpreter executes every program in Python, so shapes stay tiny; d_in/d_out are not powers of
two and segments are shorter and longer than the tiles so that every mask is exercised.
"""

from __future__ import annotations

import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kernels import (make_lora_plan, s2ft_col, s2ft_col_reference, s2ft_dense_delta, s2ft_row,  # noqa: E402
                     s2ft_row_reference, sgmv_lora, sgmv_lora_reference)
from kernels.dispatch import select_kernels  # noqa: E402
from kernels.experts import routed_experts_reference  # noqa: E402
from kernels.triton import autotune  # noqa: E402
from kernels.triton import lora as triton_lora  # noqa: E402
from kernels.triton.experts import routed_experts_triton  # noqa: E402
from kernels.triton.s2ft import s2ft_col_triton, s2ft_row_triton  # noqa: E402
from tests import test_experts_kernels as expert_cases  # noqa: E402
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


@pytest.mark.parametrize("shape", list(SHAPES))
def test_bf16_pools_under_float32_activations(shape: str) -> None:
    """--lora-dtype bfloat16 with a float32 model: the kernels widen the rows they read."""
    num_seqs, tokens = SHAPES[shape]
    b = lora_cases.make_batch("zipf:1.5", num_seqs, tokens, ranks=RANKS, base_frac=0.2, d_in=40, d_out=72, seed=7)
    a16, b16 = b.lora_a.bfloat16(), b.lora_b.bfloat16()
    y_ref, y_tri = b.y.clone(), b.y.clone()
    sgmv_lora_reference(y_ref, b.x, a16, b16, b.plan)
    triton_lora.sgmv_lora_triton(y_tri, b.x, a16, b16, b.plan)
    assert y_tri.dtype == torch.float32
    torch.testing.assert_close(y_tri, y_ref, **lora_cases.tolerances(torch.bfloat16, y_ref - b.y))


@DTYPES
@pytest.mark.parametrize("rank", [64, 128, 256])
@pytest.mark.parametrize("path", ["bgmv", "sgmv"])
def test_ranks_above_the_rank_tile_cap_are_computed_in_rank_chunks(path: str, rank: int, dtype: torch.dtype) -> None:
    # the rank tile stays <= RANK_BUCKET_CAP rows: a rank-256 adapter is 4 SGMV / 16 BGMV (interpreter tile) chunks
    tokens = 1 if path == "bgmv" else (5, 9)
    b = lora_cases.make_batch("distinct", 4, tokens, ranks=[rank, 3, rank // 2 + 1], base_frac=0.0, d_in=20,
                              d_out=18, dtype=dtype, seed=rank)
    check_lora(b)
    meta = b.plan.triton_meta
    assert meta.max_rank == rank and (meta.max_seg_len <= triton_lora.BGMV_MAX_SEG_LEN) == (path == "bgmv")
    assert autotune.rank_bucket(rank) == autotune.RANK_BUCKET_CAP


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

EXPERT_MISSING = [None, "gate", "up", "down", "gate+up"]


def check_routed(n: int, routing: str, missing: str | None, dtype: torch.dtype, adapters: int, seed: int = 0) -> None:
    args = expert_cases._case(n, routing, missing, dtype, seed, adapters)
    shape = (adapters, n, expert_cases.I)
    ref, tri = (torch.full(shape, float("nan"), dtype=dtype) for _ in range(2))  # rows must be overwritten
    z_ref = routed_experts_reference(ref, *args, expert_cases.E)
    z = routed_experts_triton(tri, *args, expert_cases.E)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(tri.float(), ref.float(), **tol)
    if missing is not None and "down" in missing:
        assert z is None and z_ref is None
    else:
        assert z.dtype == dtype
        torch.testing.assert_close(z.float(), z_ref.float(), **tol)


@DTYPES
@pytest.mark.parametrize("adapters", [1, 3])
@pytest.mark.parametrize("missing", EXPERT_MISSING)
@pytest.mark.parametrize("routing", ["top2", "top1", "dense"])
def test_routed_experts_triton_matches_reference(routing: str, missing: str | None, adapters: int, dtype: torch.dtype) -> None:
    # 6 tokens: one token tile, rows masked; i = 40: i-tiles with a masked tail; E·r = 12 rank rows, r = 3
    check_routed(6, routing, missing, dtype, adapters, seed=len(routing) + adapters)


@pytest.mark.parametrize("routing", ["top2", "dense"])
def test_routed_experts_triton_over_several_token_tiles(routing: str) -> None:
    # 37 tokens: three token tiles whose tokens route to every expert, so each slot's rank chunks mix experts
    check_routed(37, routing, None, torch.float32, 1, seed=4)


def test_routed_experts_triton_takes_the_layer_layout_of_strided_views() -> None:
    # as ExpertsStep passes them: sg, su column slices of one [router | gate | up] shrink, gate_up a row slice
    A, n, I, E, R = 2, 5, expert_cases.I, expert_cases.E, expert_cases.R
    gen = torch.Generator().manual_seed(9)
    s = torch.randn(A, n, E + 2 * E * R, generator=gen)
    sg, su = s[..., E:E + E * R], s[..., E + E * R:]
    gate_up = torch.randn(A, n + 3, 2 * I, generator=gen)[:, 1:n + 1]
    gb, ub, da = (torch.randn(A, E * R, I, generator=gen) / 3 for _ in range(3))
    top, experts = torch.randn(A, n, E, generator=gen).softmax(-1).topk(2, -1)
    ref, tri = torch.empty(A, n, I), torch.empty(A, n, I)
    z_ref = routed_experts_reference(ref, gate_up, sg, su, gb, ub, da, experts, top, E)
    z = routed_experts_triton(tri, gate_up, sg, su, gb, ub, da, experts.to(torch.int32), top, E)
    torch.testing.assert_close(tri, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)


def test_routed_experts_triton_with_no_tokens_and_bad_shapes() -> None:
    gate_up, sg, su, gb, ub, da, experts, weights = expert_cases._case(0, "top2", None, torch.float32, 0, 2)
    z = routed_experts_triton(torch.empty(2, 0, expert_cases.I), gate_up, sg, su, gb, ub, da, experts, weights, expert_cases.E)
    assert z.shape == (2, 0, expert_cases.E * expert_cases.R)
    gate_up, sg, su, gb, ub, da, experts, weights = expert_cases._case(4, "top2", None, torch.float32, 0)
    with pytest.raises(ValueError):
        routed_experts_triton(torch.empty(1, 4, expert_cases.I), gate_up, sg, su, gb[:, :-1], ub, da, experts, weights,
                              expert_cases.E)
    with pytest.raises(ValueError):  # a shrink without its row block
        routed_experts_triton(torch.empty(1, 4, expert_cases.I), gate_up, sg, su, None, ub, da, experts, weights, expert_cases.E)


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

# Compiles every kernel down to an sm_90 cubin (the triton wheel bundles ptxas and cuobjdump) for its
# first autotune config and, at rank buckets 16 and 64, for the config the register budget keeps with
# the largest estimate, so code that only the GPU compiler sees (layouts, MMA, barriers, split-K
# atomics) is checked here too, and the budget is checked against ptxas: no kept config may spill
# (cuobjdump's STACK: the local-memory frame spills go to). Runs without TRITON_INTERPRET, in a subprocess.
AOT_CHECK = r"""
import os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.triton import autotune as T, experts as X, lora as L, s2ft as S
assert not T.INTERPRET
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
consts = {  # constexprs the launch passes, by rank bucket
    L._sgmv_shrink_kernel: lambda rb: dict(BLOCK_R=rb, PRECISION="tf32"),
    L._sgmv_expand_kernel: lambda rb: dict(BLOCK_R=rb, PRECISION="tf32"),
    L._bgmv_shrink_kernel: lambda rb: {},
    L._bgmv_expand_kernel: lambda rb: {},
    X._routed_experts_kernel: lambda rb: dict(PRECISION="tf32"),
    S._s2ft_col_kernel: lambda rb: dict(PRECISION="tf32"),
    S._s2ft_row_scatter_kernel: lambda rb: {},
}
types = {"v_ptr": "*fp32", "h_ptr": "*fp32", "idx_ptr": "*i64", "ex_ptr": "*i64", "w_ptr": "*fp32", "z_ptr": "*fp32"}
for kern, const in consts.items():
    fn = kern.fn
    prune = kern.early_config_prune
    todo = [(kern.configs[0], const(16), False)]
    for rb in (16, 32, 64):
        args = {"rank_bucket": rb, **const(rb)}
        kept = prune(kern.configs, {"rank_bucket": rb}, **const(rb))
        est = {c: T.register_estimate(c, prune.tile_elems, args) for c in kept}
        assert all(e <= T.REGISTER_BUDGET and c.kwargs.get("BLOCK_R", 0) <= rb for c, e in est.items()), fn.__name__
        if rb != 32:
            todo.append((max(kept, key=lambda c: (est[c], c.kwargs.get("BLOCK_R", 0), c.num_warps)), const(rb), True))
    for cfg, c0, budgeted in todo:
        c = {**c0, **cfg.kwargs}
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
        if budgeted and os.path.exists(CUOBJDUMP):
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(out.asm["cubin"])
                f.flush()
                usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
            regs, stack = (int(re.search(rf"{k}:(\d+)", usage).group(1)) for k in ("REG", "STACK"))
            print(fn.__name__, c, "warps", cfg.num_warps, "registers", regs, "stack", stack)
            assert stack == 0, f"{fn.__name__} {c} num_warps={cfg.num_warps} spills: {usage}"
"""


def test_kernels_compile_for_sm90_and_the_configs_kept_do_not_spill() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", AOT_CHECK], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode == 77:
        pytest.skip("triton's ptxas is not available")
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("stack 0") >= 10 or not r.stdout, r.stdout  # the kept configs were measured


# ----------------------------------------------------------------------------------------- autotuning


def test_register_budget_drops_tiles_that_would_spill_and_rank_tiles_wider_than_the_bucket() -> None:
    import triton

    cfgs = [triton.Config({"BLOCK_R": br, "BLOCK_K": bk}, num_warps=nw)
            for br, bk, nw in ((16, 128, 4), (16, 256, 4), (16, 512, 4), (64, 128, 4), (64, 128, 8), (64, 512, 4))]
    tile = triton_lora._bgmv_shrink_tile  # 2 x R x K elements, 2 registers each
    kept = autotune.fit_register_budget(cfgs, tile, {"rank_bucket": 64})
    assert [(c.kwargs["BLOCK_R"], c.kwargs["BLOCK_K"], c.num_warps) for c in kept] == [(16, 128, 4), (16, 256, 4), (64, 128, 8)]
    kept = autotune.fit_register_budget(cfgs, tile, {"rank_bucket": 16})  # 64-row rank tiles: masked rows only
    assert [(c.kwargs["BLOCK_R"], c.kwargs["BLOCK_K"]) for c in kept] == [(16, 128), (16, 256)]
    assert autotune.fit_register_budget(cfgs[-1:], tile, {"rank_bucket": 64}) == cfgs[-1:]  # nothing fits: the smallest


def test_autotune_keys_are_buckets() -> None:
    assert [autotune.rank_bucket(r) for r in (1, 8, 16, 17, 33, 64, 65, 256, 4096)] == [16, 16, 16, 32, 64, 64, 64, 64, 64]
    assert [autotune.token_bucket(t) for t in (0, 1, 3, 5, 1000, 1025, 10 ** 6)] == [1, 1, 4, 8, 1024, 1024, 1024]
    assert autotune.rank_buckets(40) == [16, 32, 64] and autotune.rank_buckets(16) == [16]
    assert autotune.token_buckets(12) == [1, 2, 4, 8, 16] and autotune.token_buckets(12, 5) == [8, 16]
    assert autotune.token_buckets(4, 5) == [] and autotune.token_buckets(5000, 5)[-1] == autotune.TOKEN_BUCKET_CAP
    for kern in (triton_lora._sgmv_shrink_kernel, triton_lora._bgmv_shrink_kernel, triton_experts_kernel(), *s2ft_kernels()):
        assert "rank_bucket" in kern.keys and not {"max_rank", "n", "T"} & set(kern.keys), kern.keys


def triton_experts_kernel():
    from kernels.triton import experts

    return experts._routed_experts_kernel


def s2ft_kernels():
    from kernels.triton import s2ft

    return [s2ft._s2ft_col_kernel, s2ft._s2ft_row_scatter_kernel]


def test_warmup_autotunes_every_bucket_key_the_server_can_meet() -> None:
    from kernels.triton import s2ft

    pairs = [(24, 40), (40, 24), (24, 40)]  # duplicates are fine
    max_rank, max_tokens, mlp, entries = 40, 8, 24, 20
    n = autotune.warmup("cpu", torch.float32, pairs, max_rank, max_tokens, mlp_sizes=[mlp], max_s2ft_entries=entries,
                        progress=False)
    d_in, d_out = {24, 40}, {40, 24}
    ranks, s2ft_ranks, tokens, lens = [16, 32, 64], [16, 32], [1, 2, 4, 8], [8]
    expected = {
        triton_lora._bgmv_shrink_kernel: {(d, r, t) for d in d_in for r in ranks for t in tokens},
        triton_lora._sgmv_shrink_kernel: {(d, r, t) for d in d_in for r in ranks for t in lens},
        triton_lora._bgmv_expand_kernel: {(d, r, t) for d in d_out for r in ranks for t in tokens},
        triton_lora._sgmv_expand_kernel: {(d, r, t) for d in d_out for r in ranks for t in lens},
        triton_experts_kernel(): {(mlp, r, t) for r in ranks for t in tokens},
        s2ft._s2ft_col_kernel: {(d, r, t) for d in d_out for r in s2ft_ranks for t in tokens},
        s2ft._s2ft_row_scatter_kernel: {(r, t) for r in s2ft_ranks for t in tokens},
    }
    for kern, keys in expected.items():
        cached = {k[:len(kern.keys)] for k in kern.cache}
        assert keys <= cached, (kern.fn.__name__, sorted(keys - cached))
    assert n == sum(len(k) for k in expected.values())


@DTYPES
@pytest.mark.parametrize("tokens", [1, 6])
def test_bgmv_plans_from_device_rows_match_the_reference(tokens: int, dtype: torch.dtype) -> None:
    """The CUDA-graph decode plan (kernels.make_bgmv_plan): per-token rows, -1 = base, mixed ranks."""
    from kernels import make_bgmv_plan

    g = torch.Generator().manual_seed(tokens)
    d_in, d_out, rows = 40, 24, 96
    a, b = torch.randn(rows, d_in, generator=g).to(dtype), torch.randn(rows, d_out, generator=g).to(dtype)
    x = torch.randn(tokens, d_in, generator=g).to(dtype)
    starts = [0, -1, 16, 40, 0, 80][:tokens]
    ranks = [8, 0, 24, 40, 3, 16][:tokens]
    plan = make_bgmv_plan(torch.tensor(starts), torch.tensor(ranks), 48)
    want = torch.randn(tokens, d_out, generator=g).to(dtype)
    ref = want.clone()
    sgmv_lora_reference(ref, x, a, b, plan)
    for op in (sgmv_lora, triton_lora.sgmv_lora_triton):
        got = want.clone()
        op(got, x, a, b, plan)
        torch.testing.assert_close(got, ref, **tolerances(dtype, ref.float() - want.float()))


def test_plan_metadata_travels_in_the_steps_one_copy() -> None:
    """The runner stages each plan's Triton metadata with the step's index tensors (kernels.staging):
    after the upload the kernels find it on the plan and make no copy of their own."""
    from kernels.staging import HostStaging

    staging = HostStaging("cpu")
    plan = make_lora_plan([0, 3, 4, 9, 10, 16], [0, -1, 8, 24, 40], [8, 0, 16, 4, 8], "cpu", staging)
    triton_lora.stage_plan_meta(plan, staging)
    assert plan.triton_meta is None
    staging.upload()
    meta = plan.triton_meta
    assert meta is not None and triton_lora.plan_meta(plan, torch.device("cpu")) is meta
    fresh = make_lora_plan([0, 3, 4, 9, 10, 16], [0, -1, 8, 24, 40], [8, 0, 16, 4, 8])
    expect = triton_lora.plan_meta(fresh, torch.device("cpu"))
    for name in ("seg_start", "seg_len", "seg_row", "seg_rank", "tok_row", "tok_rank"):
        assert torch.equal(getattr(meta, name), getattr(expect, name)), name
    g = torch.Generator().manual_seed(0)
    x, a, b = torch.randn(16, 24, generator=g), torch.randn(48, 24, generator=g), torch.randn(48, 20, generator=g)
    y, ref = torch.zeros(16, 20), torch.zeros(16, 20)
    triton_lora.sgmv_lora_triton(y, x, a, b, plan)
    sgmv_lora_reference(ref, x, a, b, plan)
    torch.testing.assert_close(y, ref, **tolerances(torch.float32, ref))


def test_bgmv_plans_keep_one_adapters_overflow_out_of_other_rows() -> None:
    """Masked (base) slots of the bgmv path read pool row 0: an adapter there whose numbers overflow
    must not turn another tenant's rows into NaN (torch op; the Triton kernels mask their loads)."""
    from kernels import make_bgmv_plan

    a, b = torch.randn(32, 16), torch.randn(32, 12)
    a[:4] = 3e38  # the adapter at rows 0..3: finite, but its products overflow
    b[:4] = float("inf")
    x, y = torch.randn(3, 16), torch.zeros(3, 12)
    plan = make_bgmv_plan(torch.tensor([-1, 8, 0]), torch.tensor([0, 8, 4]), 8)
    sgmv_lora(y, x, a, b, plan)
    assert torch.isfinite(y[:2]).all() and not torch.isfinite(y[2]).all()  # only the overflowing adapter's own row
