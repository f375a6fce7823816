"""GPU microbenchmark of the batched adapter ops: Triton kernels vs the torch fast ops vs the readable
references (and vLLM's punica LoRA kernels when vllm is importable).

    python -m kernels.bench [--dtype bf16] [--tokens 1 4 16 64 256] [--d 4096] [--rank 16] [--big-rank 256]
    python -m kernels.bench --interpret        # no GPU: tiny CPU smoke run under TRITON_INTERPRET=1

Prints microseconds per call (median of triton.testing.do_bench) and the largest |Triton - reference|
of each case. Decode cases: T one-token sequences whose adapters follow a popularity pattern
(distinct / uniform / zipf / identical); prefill cases: a few long sequences; "r256" rows: the decode
cases of distinct adapters at --big-rank (BGMV in rank chunks); "experts" rows: kernels.experts'
routed_experts (Triton fused kernel vs the torch op) for groups of --expert-adapters adapters with
--experts experts of rank --rank on an MLP of --intermediate, top-2 and dense (sigmoid) routing. Run
it as a module: `python kernels/bench.py` would make kernels/triton shadow the triton package.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from kernels.triton import bench_device

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PATTERNS = ["distinct", "uniform", "zipf", "identical"]


@dataclass
class Case:
    name: str
    tokens: int
    seg_tokens: list[int]  # tokens per segment, in order
    seg_adapter: list[int]  # adapter of each segment (-1 = base)


def decode_case(pattern: str, T: int, num_adapters: int, rng: random.Random) -> Case:
    """T one-token sequences; tokens grouped by adapter as the engine does."""
    if pattern == "distinct":
        ids = list(range(T))
    elif pattern == "identical":
        ids = [0] * T
    elif pattern == "uniform":
        ids = [rng.randrange(num_adapters) for _ in range(T)]
    elif pattern == "zipf":
        ids = rng.choices(range(num_adapters), weights=[1 / (k + 1) ** 1.5 for k in range(num_adapters)], k=T)
    else:
        raise ValueError(pattern)
    counts: dict[int, int] = {}
    for a in ids:
        counts[a] = counts.get(a, 0) + 1
    return Case(f"decode/{pattern}", T, list(counts.values()), list(counts))


def prefill_case(num_seqs: int, seq_len: int) -> Case:
    return Case(f"prefill/{num_seqs}x{seq_len}", num_seqs * seq_len, [seq_len] * num_seqs, list(range(num_seqs)))


def plan_for(case: Case, rows_per_adapter: int, device: torch.device):
    from kernels.lora_plan import make_lora_plan

    indptr = [0]
    for n in case.seg_tokens:
        indptr.append(indptr[-1] + n)
    starts = [-1 if a < 0 else a * rows_per_adapter for a in case.seg_adapter]
    ranks = [0 if a < 0 else rows_per_adapter for a in case.seg_adapter]
    return make_lora_plan(indptr, starts, ranks, device=device)


def n_adapters(case: Case) -> int:
    return max(case.seg_adapter) + 1


# ------------------------------------------------------------------------------------------- timing


def time_us(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return 1000.0 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    fn()  # interpreter smoke run: one warm call, then one timed call
    t = time.perf_counter()
    fn()
    return 1e6 * (time.perf_counter() - t)


def max_err(op: Callable[..., None], ref: Callable[..., None], y: torch.Tensor, *args) -> float:
    a, b = y.clone(), y.clone()
    op(a, *args)
    ref(b, *args)
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


# --------------------------------------------------------------------------------------------- vLLM


def vllm_lora_fn(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, case: Case,
                 rank: int) -> Callable[[], None] | str:
    """vLLM's punica shrink + expand on the same batch (uniform rank: stacked [L, r, d_in] / [L, d_out, r]);
    a string saying why when vllm is missing or its API differs from the one this was written against
    (vllm.lora.ops.triton_ops: LoRAKernelMeta, lora_shrink, lora_expand)."""
    try:
        from vllm.lora.ops.triton_ops import LoRAKernelMeta, lora_expand, lora_shrink
    except Exception as e:  # ImportError, or vllm failing to initialise
        return f"n/a ({type(e).__name__})"
    try:
        L = n_adapters(case)
        a_st = lora_a[: L * rank].view(L, rank, -1).contiguous()
        b_st = lora_b[: L * rank].view(L, rank, -1).transpose(1, 2).contiguous()
        mapping = torch.cat([torch.full((n,), a, dtype=torch.int32) for n, a in zip(case.seg_tokens, case.seg_adapter)])
        meta = LoRAKernelMeta.make(L, case.tokens, x.device)
        meta.prepare_tensors(mapping.to(x.device))
        args = meta.meta_args(case.tokens)
        v = torch.zeros(1, case.tokens, rank, dtype=torch.float32, device=x.device)

        def run() -> None:
            lora_shrink(x, [a_st], v, *args, 1.0)
            lora_expand(v, [b_st], y, *args, offset_start=0, add_inputs=True)

        run()
        return run
    except Exception as e:
        return f"n/a ({type(e).__name__}: {str(e)[:40]})"


# -------------------------------------------------------------------------------------------- bench


def bench_lora(case: Case, args, device: torch.device, dtype: torch.dtype, rows: list[list[str]],
               rank: int | None = None) -> None:
    from kernels.lora import sgmv_lora, sgmv_lora_reference
    from kernels.triton.lora import sgmv_lora_triton

    g = torch.Generator(device="cpu").manual_seed(0)
    L, r, d_in, d_out = n_adapters(case), rank or args.rank, args.d, args.d_out or args.d
    x = torch.randn(case.tokens, d_in, generator=g).to(device, dtype)
    y = torch.zeros(case.tokens, d_out, device=device, dtype=dtype)
    lora_a = (torch.randn(L * r, d_in, generator=g) / d_in ** 0.5).to(device, dtype)
    lora_b = (torch.randn(L * r, d_out, generator=g) / r).to(device, dtype)
    plan = plan_for(case, r, device)
    ops = {"triton": sgmv_lora_triton, "torch": sgmv_lora}
    if not args.skip_reference:
        ops["reference"] = sgmv_lora_reference
    us = {k: time_us(lambda op=op: op(y, x, lora_a, lora_b, plan), device) for k, op in ops.items()}
    vl = vllm_lora_fn(x, y, lora_a, lora_b, case, r) if device.type == "cuda" else "n/a (cpu)"
    us_v = time_us(vl, device) if callable(vl) else vl
    err = max_err(sgmv_lora_triton, sgmv_lora_reference, y.zero_(), x, lora_a, lora_b, plan)
    path = "bgmv" if plan.triton_meta.max_seg_len <= _bgmv_len() else "sgmv"
    name = f"lora {case.name}" + (f" r{r}" if rank else "")
    rows.append([name, str(case.tokens), str(len(case.seg_tokens)), path, *fmt(us, args), fmt_one(us_v),
                 speedup(us), f"{err:.1e}"])


def bench_s2ft(kind: str, case: Case, args, device: torch.device, dtype: torch.dtype, rows: list[list[str]]) -> None:
    from kernels.s2ft import s2ft_col, s2ft_col_reference, s2ft_row, s2ft_row_reference
    from kernels.triton.s2ft import s2ft_col_triton, s2ft_row_triton

    g = torch.Generator(device="cpu").manual_seed(1)
    L, k, d_in, d_out = n_adapters(case), args.s2ft_entries, args.d, args.d_out or args.d
    x = torch.randn(case.tokens, d_in, generator=g).to(device, dtype)
    y = torch.zeros(case.tokens, d_out, device=device, dtype=dtype)
    limit, width = (d_in, d_out) if kind == "col" else (d_out, d_in)
    idx = torch.cat([torch.randperm(limit, generator=g)[:k] for _ in range(L)]).to(device)
    w = (torch.randn(L * k, width, generator=g) / width ** 0.5).to(device, dtype)
    plan = plan_for(case, k, device)
    tri, fast, ref = ((s2ft_col_triton, s2ft_col, s2ft_col_reference) if kind == "col"
                      else (s2ft_row_triton, s2ft_row, s2ft_row_reference))
    ops = {"triton": tri, "torch": fast}
    if not args.skip_reference:
        ops["reference"] = ref
    us = {name: time_us(lambda op=op: op(y, x, idx, w, plan), device) for name, op in ops.items()}
    err = max_err(tri, ref, y.zero_(), x, idx, w, plan)
    rows.append([f"s2ft-{kind} {case.name}", str(case.tokens), str(len(case.seg_tokens)), "-", *fmt(us, args), "-",
                 speedup(us), f"{err:.1e}"])


def bench_experts(routing: str, A: int, n: int, args, device: torch.device, dtype: torch.dtype,
                  rows: list[list[str]]) -> None:
    """routed_experts for A adapters of n tokens each: Triton's fused kernel vs the torch op; the error
    against the readable reference (run on CPU copies, only for small groups: it loops over tokens)."""
    from kernels.experts import routed_experts, routed_experts_reference
    from kernels.triton.experts import routed_experts_triton

    g = torch.Generator(device="cpu").manual_seed(2)
    E, r, i = args.experts, args.rank, args.intermediate
    er = E * r

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    gate_up, sg, su = rnd(A, n, 2 * i), rnd(A, n, er), rnd(A, n, er)
    gate_b, up_b, down_a = rnd(A, er, i, scale=0.05), rnd(A, er, i, scale=0.05), rnd(A, er, i, scale=i ** -0.5)
    logits = torch.randn(A, n, E, generator=g).to(device)
    if routing == "dense":
        experts, weights = None, torch.sigmoid(logits)
    else:
        top, experts = logits.topk(int(routing[-1]), dim=-1)
        weights = top.softmax(-1)
    args_ = (gate_up, sg, su, gate_b, up_b, down_a, experts, weights, E)
    act = torch.empty(A, n, i, device=device, dtype=dtype)
    us = {name: time_us(lambda op=op: op(act, *args_), device)
          for name, op in (("triton", routed_experts_triton), ("torch", routed_experts))}
    err = "-"
    if not args.skip_reference and A * n <= 64:
        cpu = [t.cpu() if isinstance(t, torch.Tensor) else t for t in args_]
        ref = torch.empty(A, n, i, dtype=dtype)
        z_ref = routed_experts_reference(ref, *cpu)
        z = routed_experts_triton(act, *args_)
        diff = max(float((act.cpu().float() - ref.float()).abs().max()), float((z.cpu().float() - z_ref.float()).abs().max()))
        err = f"{diff:.1e}"
    rows.append([f"experts {routing} A{A} E{E} r{r} i{i}", str(A * n), str(A), "fused", fmt_one(us["triton"]),
                 fmt_one(us["torch"]), "-", "-", speedup(us), err])


def _bgmv_len() -> int:
    from kernels.triton.lora import BGMV_MAX_SEG_LEN

    return BGMV_MAX_SEG_LEN


def fmt_one(v: float | str) -> str:
    return v if isinstance(v, str) else f"{v:.1f}"


def fmt(us: dict[str, float], args) -> list[str]:
    cols = ["triton", "torch"] + ([] if args.skip_reference else ["reference"])
    return [fmt_one(us[c]) for c in cols] + (["skipped"] if args.skip_reference else [])


def speedup(us: dict[str, float]) -> str:
    return f"{us['torch'] / us['triton']:.2f}x"


def print_table(rows: list[list[str]]) -> None:
    head = ["case", "T", "segs", "path", "triton us", "torch us", "ref us", "vllm us", "torch/triton", "max|err|"]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths]] + rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256], help="decode batch sizes")
    p.add_argument("--patterns", nargs="+", choices=PATTERNS, default=PATTERNS)
    p.add_argument("--prefill", nargs="+", default=["1x2048", "4x512", "16x128"], help="NUM_SEQSxSEQ_LEN")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--d", type=int, default=4096, help="d_in (and d_out unless --d-out)")
    p.add_argument("--d-out", type=int, default=None)
    p.add_argument("--adapters", type=int, default=32, help="resident adapters for uniform / zipf")
    p.add_argument("--s2ft-entries", type=int, default=64, help="S²FT columns/rows per adapter")
    p.add_argument("--big-rank", type=int, default=256, help="rank of the large-rank decode cases (0: none)")
    p.add_argument("--intermediate", type=int, default=11008, help="MLP intermediate size of the routed-experts cases")
    p.add_argument("--experts", type=int, default=8, help="experts per adapter in the routed-experts cases")
    p.add_argument("--expert-adapters", type=int, nargs="+", default=[1, 4], help="adapters per routed-experts group")
    p.add_argument("--skip-reference", action="store_true", help="skip the (slow, per-segment loop) references")
    p.add_argument("--interpret", action="store_true", help="no GPU: tiny CPU run under TRITON_INTERPRET=1")
    args = p.parse_args(argv)

    if args.interpret:
        args.tokens, args.prefill, args.d, args.d_out, args.rank = [1, 8], ["2x24"], 96, 80, 8
        args.adapters, args.s2ft_entries, args.dtype = 8, 12, "fp32"
        args.big_rank, args.intermediate, args.experts, args.expert_adapters = 80, 48, 4, [1, 2]
    device = bench_device("kernels.bench", args.interpret)
    if device is None:
        return 0
    dtype = DTYPES[args.dtype]
    rng = random.Random(0)
    cases = [decode_case(pt, T, args.adapters, rng) for T in args.tokens for pt in args.patterns]
    for spec in args.prefill:
        n, s = (int(v) for v in spec.lower().split("x"))
        cases.append(prefill_case(n, s))
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (TRITON_INTERPRET=1)"
    print(f"device {dev_name}, dtype {args.dtype}, d_in {args.d}, d_out {args.d_out or args.d}, rank {args.rank}, "
          f"S²FT entries {args.s2ft_entries}; microseconds per call (median)")
    rows: list[list[str]] = []
    for case in cases:
        bench_lora(case, args, device, dtype, rows)
    if args.big_rank:
        for case in cases:
            if case.name == "decode/distinct":
                bench_lora(case, args, device, dtype, rows, rank=args.big_rank)
    for kind in ("col", "row"):
        for case in cases:
            bench_s2ft(kind, case, args, device, dtype, rows)
    for routing in ("top2", "dense"):
        for A in args.expert_adapters:
            for T in args.tokens:
                bench_experts(routing, A, max(1, T // A), args, device, dtype, rows)
    print_table(rows)
    if args.interpret:
        print("(interpreter run: checks that every kernel launches and matches its reference; the timings mean nothing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
