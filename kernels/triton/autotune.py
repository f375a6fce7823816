"""Autotuning of the adapter kernels: bucketed keys, configs that do not spill, and a start-up warmup.

Every kernel's autotune key is (model dimension, rank bucket, token bucket) — plus the dtypes of its
tensor arguments, which triton's Autotuner appends — so the set of keys a server can meet is finite
and known at start-up: `warmup` launches each kernel once per key before serving, and the serving loop
only ever hits the autotuners' caches (a miss there would benchmark every config inside a request).

    rank bucket  = next power of two of the largest rank (>= 16, tl.dot's minimum), capped at RANK_BUCKET_CAP
    token bucket = next power of two of the token count / longest segment, capped at TOKEN_BUCKET_CAP

Above the caps the kernels loop over rank chunks / token blocks whose tile size no longer depends on
the rank or the length, so one tuned config serves them all.
"""

from __future__ import annotations

import inspect
import os
from typing import Callable, Iterable, Sequence

import torch
import triton

__all__ = ["INTERPRET", "RANK_BUCKET_CAP", "TOKEN_BUCKET_CAP", "REGISTER_BUDGET", "rank_bucket", "token_bucket",
           "configs", "register_prune", "register_estimate", "fit_register_budget", "rank_buckets", "token_buckets", "warmup"]

# The interpreter runs every program in Python: autotuning there would only multiply test time.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Rank tiles never exceed 64 rows: a larger rank is looped over (or split across programs) in chunks,
# so the register tile is bounded whatever the adapter's rank.
RANK_BUCKET_CAP = 64
# Past ~1024 tokens (or a 1024-token segment) every config fills the GPU; the best one stops changing.
TOKEN_BUCKET_CAP = 1024

# Registers per thread that a program's tiles may take. sm_90 gives a thread at most 255; past ~200
# ptxas starts spilling to local memory (the old BGMV shrink with a rank-256 tile: a 256 x 128 fp32
# accumulator, ~10 KB of spill stores per thread), and a register-heavy program also leaves fewer warps
# per SM to hide memory latency, which these memory-bound kernels need. Each live tile element costs
# about REGISTERS_PER_ELEMENT registers: its value plus its share of the pointer, mask and conversion
# tensors (fitted to `ptxas -v` for sm_90a on every candidate config: those the budget keeps use at most
# ~210 registers and none spills; tests/test_triton_kernels.py re-checks the largest kept ones).
REGISTER_BUDGET = 128
REGISTERS_PER_ELEMENT = 2


def rank_bucket(max_rank: int) -> int:
    """The rank part of an autotune key: next power of two of max_rank, in [16, RANK_BUCKET_CAP]."""
    return min(max(16, triton.next_power_of_2(max(int(max_rank), 1))), RANK_BUCKET_CAP)


def token_bucket(tokens: int) -> int:
    """The token part of an autotune key: next power of two of a token count or segment length, <= TOKEN_BUCKET_CAP."""
    return min(triton.next_power_of_2(max(int(tokens), 1)), TOKEN_BUCKET_CAP)


def rank_buckets(max_rank: int) -> list[int]:
    """Every rank bucket a rank in [1, max_rank] falls in."""
    top = rank_bucket(max_rank)
    return [b for b in (16 << s for s in range(8)) if b <= top]


def token_buckets(max_tokens: int, first: int = 1) -> list[int]:
    """Every token bucket of a count in [first, max_tokens] (empty when max_tokens < first)."""
    if max_tokens < first:
        return []
    lo, hi = token_bucket(first), token_bucket(max_tokens)
    return [1 << s for s in range(lo.bit_length() - 1, hi.bit_length())]


def _bench(kernel_call: Callable[[], None], quantiles: Sequence[float]) -> list[float]:
    # A few ms per config instead of triton's 25 + 100: warmup times each config of hundreds of keys.
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=2, rep=10, quantiles=list(quantiles))


_SUPPORTED = inspect.signature(triton.autotune).parameters
# cache_results: best configs are kept on disk (triton's cache dir), so a restart skips benchmarking.
AUTOTUNE_OPTIONS = {k: v for k, v in (("do_bench", _bench), ("cache_results", True)) if k in _SUPPORTED}


def configs(interpret: dict, gpu: list[dict], num_warps: int = 4) -> list[triton.Config]:
    """The candidate configs on a GPU; under TRITON_INTERPRET=1 the `interpret` one, listed twice.

    Twice so that the Autotuner takes its keyed path and fills its per-key cache (what warmup fills and
    tests inspect); register_prune then keeps one of the two, so nothing is benchmarked. A gpu entry
    may carry its own "num_warps" / "num_stages".
    """
    if INTERPRET:
        return [triton.Config(dict(interpret), num_warps=1) for _ in range(2)]
    out = []
    for c in gpu:
        c = dict(c)
        nw, ns = c.pop("num_warps", num_warps), c.pop("num_stages", 3)
        out.append(triton.Config(c, num_warps=nw, num_stages=ns))
    return out


TileFn = Callable[[dict], int]


def register_estimate(c: triton.Config, tile_elems: TileFn, args: dict) -> float:
    """Registers per thread for the live tiles of config c: REGISTERS_PER_ELEMENT x
    tile_elems({**args, **c.kwargs}) / (num_warps * 32 threads)."""
    return REGISTERS_PER_ELEMENT * tile_elems({**args, **c.kwargs}) / (c.num_warps * 32)


def fit_register_budget(cfgs: list[triton.Config], tile_elems: TileFn, args: dict,
                        budget: int = REGISTER_BUDGET) -> list[triton.Config]:
    """The configs whose register_estimate stays <= budget and whose BLOCK_R (where tuned) does not
    exceed args["rank_bucket"] (a wider rank tile only multiplies masked rows); at least the one with
    the smallest estimate. tile_elems(launch arguments and config kwargs) -> elements of the tiles one
    program keeps live (accumulators and operand tiles)."""
    rb = args.get("rank_bucket")

    def per_thread(c: triton.Config) -> float:
        return register_estimate(c, tile_elems, args)

    fit = [c for c in cfgs if per_thread(c) <= budget and (rb is None or c.kwargs.get("BLOCK_R", 0) <= rb)]
    return fit or [min(cfgs, key=lambda c: (c.kwargs.get("BLOCK_R", 0) > (rb or 0), per_thread(c)))]


def register_prune(tile_elems: TileFn, budget: int = REGISTER_BUDGET) -> dict:
    """prune_configs_by for triton.autotune: fit_register_budget on the launch's arguments; under the
    interpreter the first (only distinct) config."""
    def prune(cfgs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        if INTERPRET:
            return cfgs[:1]
        return fit_register_budget(cfgs, tile_elems, {**named_args, **kwargs}, budget)
    prune.tile_elems = tile_elems  # type: ignore[attr-defined]  # for tests and tools
    return {"early_config_prune": prune}


# --------------------------------------------------------------------------------------------------
# Start-up warmup
# --------------------------------------------------------------------------------------------------

# Warmup batches: segments spread over this many adapters' rows (pools stay small whatever the token
# count), at most this many segments of one length.
_WARMUP_ADAPTERS = 8
_WARMUP_MAX_SEGS = 64


def _bucket_rank(rb: int, top: int) -> int:
    """The rank a warmup launch uses for bucket rb: the largest rank <= top in it (the last bucket holds top)."""
    return top if rb >= rank_bucket(top) else rb


def _warmup_jobs(device: torch.device, dtype: torch.dtype, d_pairs: Iterable[tuple[int, int]], max_rank: int,
                 max_tokens: int, mlp_sizes: Iterable[int], max_s2ft_entries: int) -> list[tuple[str, Callable[[], None]]]:
    """(label, launch) per autotune key to warm, labels "kernel key..."; each launch runs its kernel at that key."""
    from kernels.lora_plan import make_lora_plan
    from kernels.triton import lora as L
    from kernels.triton.experts import routed_experts_triton
    from kernels.triton.s2ft import s2ft_col_triton, s2ft_row_triton

    pairs = sorted({(int(a), int(b)) for a, b in d_pairs})
    d_ins, d_outs = sorted({a for a, _ in pairs}), sorted({b for _, b in pairs})
    x_for_out = {b: a for a, b in pairs}  # any d_in paired with each d_out

    def rnd(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:  # made on the device: some are 100M+ elements
        return torch.randn(*shape, device=device, dtype=dt) / 8

    def plan(seg_len: int, rank: int, count: int):
        """count segments of seg_len tokens, adapters' rows round-robin over _WARMUP_ADAPTERS."""
        count = max(1, min(count, _WARMUP_MAX_SEGS if seg_len > 1 else TOKEN_BUCKET_CAP))
        starts = [(s % _WARMUP_ADAPTERS) * rank for s in range(count)]
        return make_lora_plan([s * seg_len for s in range(count + 1)], starts, [rank] * count, device=device)

    jobs: list[tuple[str, Callable[[], None]]] = []
    shrink_top = max(max_rank, max_s2ft_entries)  # S²FT's row kind runs the LoRA shrink over its entries
    # BGMV keys: the batch's token count (one token per segment); SGMV keys: the longest segment (>= 5 tokens)
    sgmv = token_buckets(max_tokens, L.BGMV_MAX_SEG_LEN + 1)
    for rb in rank_buckets(shrink_top) if shrink_top > 0 else []:
        r = _bucket_rank(rb, shrink_top)
        for T in token_buckets(max_tokens):
            p = L.plan_meta(plan(1, r, T), device)
            for d_in in d_ins:
                jobs.append((f"bgmv_shrink {d_in} r{rb} T{T}", lambda p=p, d_in=d_in, r=r: L.bgmv_shrink(
                    rnd(p.tok_row.shape[0], d_in), rnd(_WARMUP_ADAPTERS * r, d_in), p.tok_row, p.tok_rank, p.max_rank,
                    torch.zeros(p.tok_row.shape[0], r, device=device))))
        for n in sgmv:
            p = L.plan_meta(plan(n, r, max_tokens // n), device)
            for d_in in d_ins:
                jobs.append((f"sgmv_shrink {d_in} r{rb} len{n}", lambda p=p, d_in=d_in, r=r: L.sgmv_shrink(
                    rnd(p.tok_row.shape[0], d_in), rnd(_WARMUP_ADAPTERS * r, d_in), p,
                    torch.zeros(p.tok_row.shape[0], r, device=device))))
    for rb in rank_buckets(max_rank) if max_rank > 0 else []:
        r = _bucket_rank(rb, max_rank)
        for T in token_buckets(max_tokens):
            p = L.plan_meta(plan(1, r, T), device)
            for d_out in d_outs:
                jobs.append((f"bgmv_expand {d_out} r{rb} T{T}", lambda p=p, d_out=d_out, r=r: L.bgmv_expand(
                    rnd(p.tok_row.shape[0], d_out), rnd(p.tok_row.shape[0], r, dt=torch.float32),
                    rnd(_WARMUP_ADAPTERS * r, d_out), p.tok_row, p.tok_rank, p.max_rank)))
        for n in sgmv:
            p = L.plan_meta(plan(n, r, max_tokens // n), device)
            for d_out in d_outs:
                jobs.append((f"sgmv_expand {d_out} r{rb} len{n}", lambda p=p, d_out=d_out, r=r: L.sgmv_expand(
                    rnd(p.tok_row.shape[0], d_out), rnd(p.tok_row.shape[0], r, dt=torch.float32),
                    rnd(_WARMUP_ADAPTERS * r, d_out), p)))
        for i in sorted({int(v) for v in mlp_sizes}):
            for n in token_buckets(max_tokens):  # tokens per adapter of a group
                jobs.append((f"routed_experts {i} r{rb} n{n}", lambda i=i, r=r, n=n: routed_experts_triton(
                    *_experts_arguments(rnd, device, dtype, i, r, n))))
    for rb in rank_buckets(max_s2ft_entries) if max_s2ft_entries > 0 else []:
        k = _bucket_rank(rb, max_s2ft_entries)
        for n in token_buckets(max_tokens):  # S²FT kernels are segment-tiled for decode and prefill alike
            pl = plan(n, k, max_tokens // n if n > 1 else max_tokens)
            T = pl.num_tokens
            for d_out in d_outs:
                d_in = x_for_out[d_out]
                idx = torch.randint(0, d_in, (_WARMUP_ADAPTERS * k,), device=device)
                jobs.append((f"s2ft_col {d_out} r{rb} len{n}", lambda pl=pl, T=T, d_in=d_in, d_out=d_out, k=k, idx=idx:
                             s2ft_col_triton(rnd(T, d_out), rnd(T, d_in), idx, rnd(_WARMUP_ADAPTERS * k, d_out), pl)))
            d_in, d_out = pairs[0]  # the scatter's key has no dimension
            idx = torch.randint(0, d_out, (_WARMUP_ADAPTERS * k,), device=device)
            jobs.append((f"s2ft_row_scatter r{rb} len{n}", lambda pl=pl, T=T, d_in=d_in, d_out=d_out, k=k, idx=idx:
                         s2ft_row_triton(rnd(T, d_out), rnd(T, d_in), idx, rnd(_WARMUP_ADAPTERS * k, d_in), pl)))
    return jobs


def _experts_arguments(rnd: Callable[..., torch.Tensor], device: torch.device, dtype: torch.dtype, i: int, r: int,
                       n: int, num_experts: int = 4, top_k: int = 2) -> tuple:
    """routed_experts arguments for one adapter: n tokens, top-k routing over num_experts of rank r."""
    er = num_experts * r
    logits = torch.randn(1, n, num_experts, device=device)
    top, experts = logits.topk(top_k, dim=-1)
    return (torch.empty(1, n, i, device=device, dtype=dtype), rnd(1, n, 2 * i), rnd(1, n, er), rnd(1, n, er),
            rnd(1, er, i), rnd(1, er, i), rnd(1, er, i), experts, top.softmax(-1), num_experts)


def warmup(device: torch.device | str, dtype: torch.dtype, d_pairs: Iterable[tuple[int, int]], max_rank: int,
           max_tokens: int, *, mlp_sizes: Iterable[int] = (), max_s2ft_entries: int = 0, progress: bool = True) -> int:
    """Autotune every adapter kernel at every key the server can meet, before serving; returns the number of keys.

    device, dtype: the model's; d_pairs: (d_in, d_out) of every adapted module (duplicates are fine);
    max_rank: the largest LoRA rank (and routed-expert rank) admitted; max_tokens: the most tokens of
    one engine step; mlp_sizes: intermediate sizes of the MLPs routed experts can sit on (the
    routed-experts op is warmed only for these); max_s2ft_entries: the most S²FT entries of one
    adapter (0: S²FT kernels are not warmed). Launches each kernel once per (dimension, rank bucket,
    token bucket) — BGMV and SGMV LoRA shrink and expand, routed experts, S²FT — on random data; on a
    GPU the first launch at a key benchmarks the key's configs (with cache_results, a restart reads
    them back from triton's cache dir). Shows a tqdm bar unless progress=False.
    """
    from tqdm import tqdm

    device = torch.device(device)
    jobs = _warmup_jobs(device, dtype, d_pairs, max_rank, max_tokens, mlp_sizes, max_s2ft_entries)
    for label, launch in tqdm(jobs, desc="Autotuning adapter kernels", unit="key", disable=not progress, leave=False):
        try:
            launch()
        except Exception as e:
            raise RuntimeError(f"kernel warmup failed at {label}: {e}") from e
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(jobs)
