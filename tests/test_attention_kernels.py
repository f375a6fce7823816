"""Paged attention ops (kernels.attention torch ops, kernels.triton.attention under TRITON_INTERPRET=1)
must equal the readable float32 references, which read keys and values from the cache only.

Shapes stay tiny (the interpreter runs every program in Python), but every case has GQA or a head_dim
that is not a power of two, random non-contiguous block tables padded with a null block, sequences
that end mid-block, exactly on a block boundary and after one token, and a block size (5) that does
not divide the kernels' key tiles.
"""

from __future__ import annotations

import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels.triton  # noqa: E402
from kernels.attention import (PrefillChunks, paged_decode_attention, paged_decode_attention_reference,  # noqa: E402
                               paged_prefill_attention, paged_prefill_attention_reference)

TRITON = kernels.triton.available()
if TRITON:
    from kernels.triton import attention as triton_attention  # noqa: E402
    from kernels.triton.lora import INTERPRET
    TRITON = INTERPRET  # imported before TRITON_INTERPRET=1 was set: no CPU launches
needs_triton = pytest.mark.skipif(not TRITON, reason="triton missing, or imported before TRITON_INTERPRET=1 was set")

# name -> (H, Hkv, head_dim)
HEADS = {"smollm2-9q3kv-hd64": (9, 3, 64), "gqa4-8q2kv-hd32": (8, 2, 32), "mha-2q2kv-hd40": (2, 2, 40)}
BLOCK_SIZES = [16, 5]
TORCH_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
ALL_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                                     ids=["fp32", "bf16", "fp16"])
HEAD_CASES = pytest.mark.parametrize("heads", list(HEADS))
BLOCKS = pytest.mark.parametrize("block_size", BLOCK_SIZES, ids=[f"bs{b}" for b in BLOCK_SIZES])


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    # Outputs are convex combinations of randn values (|o| <~ 3). fp32: only summation order differs.
    # bf16 (ulp 2^-8) / fp16 (ulp 2^-11): the reference rounds once; the fast ops may also round the
    # probabilities for the P @ V product (Triton on GPU) or compute in 16 bits (CPU SDPA).
    return {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
            torch.float16: dict(rtol=5e-3, atol=5e-3)}[dtype]


def decode_lens(bs: int) -> list[int]:
    """One token, exactly one block, mid-block, exactly three blocks, and one past a boundary."""
    return [1, bs, 2 * bs + 3, 3 * bs, bs + 1, 7]


def prefill_specs(bs: int) -> list[tuple[int, int]]:
    """(context_len, chunk length): fresh prompts (context 0, one of them a single token) and
    continuations whose context ends mid-block, on a boundary, and spans several key tiles."""
    return [(0, 7), (5, 12), (bs, 1), (0, 1), (2 * bs + 3, 20), (3 * bs, bs)]


class PagedCache:
    """Caches with block 0 as the null block (padding target) and sequences on shuffled blocks."""

    def __init__(self, lengths: list[int], bs: int, Hkv: int, hd: int, dtype: torch.dtype, seed: int,
                 null: str = "garbage"):
        self.gen = torch.Generator().manual_seed(seed)
        need = [math.ceil(n / bs) for n in lengths]
        num_blocks = 1 + sum(need) + 3  # a few blocks nobody owns
        self.k_cache = torch.randn(num_blocks, bs, Hkv, hd, generator=self.gen).to(dtype)
        self.v_cache = torch.randn(num_blocks, bs, Hkv, hd, generator=self.gen).to(dtype)
        self.set_null(null)
        order = (torch.randperm(num_blocks - 1, generator=self.gen) + 1).tolist()  # never block 0
        self.tables, used = [], 0
        for k in need:
            self.tables.append(order[used:used + k])
            used += k
        self.width = max(need) + 1  # every row has padding, the longest one included

    def set_null(self, null: str) -> None:
        if null == "zeros":
            self.k_cache[0], self.v_cache[0] = 0, 0
        else:  # large, finite: a bug that lets padding in shows, and NaN could not hide it
            self.k_cache[0] = 50 * torch.randn(self.k_cache.shape[1:], generator=self.gen)
            self.v_cache[0] = 1e3 * torch.randn(self.v_cache.shape[1:], generator=self.gen)

    def padded_tables(self) -> torch.Tensor:
        return torch.tensor([t + [0] * (self.width - len(t)) for t in self.tables], dtype=torch.int64)

    def write(self, table: list[int], positions: range, k: torch.Tensor, v: torch.Tensor) -> None:
        bs = self.k_cache.shape[1]
        for j, p in enumerate(positions):
            self.k_cache[table[p // bs], p % bs] = k[j]
            self.v_cache[table[p // bs], p % bs] = v[j]


def strided_q(T: int, H: int, hd: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """q as the model gets it: a non-contiguous view into a fused projection."""
    qkv = torch.randn(T, H * hd + 3 * hd, generator=gen).to(dtype)
    return qkv[:, :H * hd].view(T, H, hd)


def decode_case(heads: str, bs: int, dtype: torch.dtype, lens: list[int] | None = None, seed: int = 0):
    H, Hkv, hd = HEADS[heads]
    lens = lens or decode_lens(bs)
    cache = PagedCache(lens, bs, Hkv, hd, dtype, seed)
    q = strided_q(len(lens), H, hd, dtype, cache.gen)
    return cache, q, cache.padded_tables(), torch.tensor(lens, dtype=torch.int64), hd**-0.5


def prefill_case(heads: str, bs: int, dtype: torch.dtype, specs: list[tuple[int, int]] | None = None, seed: int = 0):
    H, Hkv, hd = HEADS[heads]
    specs = specs or prefill_specs(bs)
    cache = PagedCache([c + n for c, n in specs], bs, Hkv, hd, dtype, seed)
    T = sum(n for _, n in specs)
    q = strided_q(T, H, hd, dtype, cache.gen)
    k = torch.randn(T, Hkv, hd, generator=cache.gen).to(dtype)
    v = torch.randn(T, Hkv, hd, generator=cache.gen).to(dtype)
    starts, ends, row = [], [], 0
    for (ctx, n), table in zip(specs, cache.tables):
        cache.write(table, range(ctx, ctx + n), k[row:row + n], v[row:row + n])  # as the layer does first
        starts.append(row)
        ends.append(row + n)
        row += n
    padded = [t + [0] * (cache.width - len(t)) for t in cache.tables]
    chunks = PrefillChunks.build(starts, ends, [c for c, _ in specs], padded, device="cpu")
    return cache, q, k, v, chunks, hd**-0.5


# ---------------------------------------------------------------------------------------------- torch ops


@TORCH_DTYPES
@BLOCKS
@HEAD_CASES
def test_torch_decode_matches_reference(heads: str, block_size: int, dtype: torch.dtype) -> None:
    cache, q, tables, lens, scale = decode_case(heads, block_size, dtype)
    out = paged_decode_attention(q, cache.k_cache, cache.v_cache, tables, lens, scale)
    ref = paged_decode_attention_reference(q, cache.k_cache, cache.v_cache, tables, lens, scale)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **tolerances(dtype))


@TORCH_DTYPES
@BLOCKS
@HEAD_CASES
def test_torch_prefill_matches_reference_over_chunks_with_and_without_context(heads: str, block_size: int,
                                                                             dtype: torch.dtype) -> None:
    cache, q, k, v, chunks, scale = prefill_case(heads, block_size, dtype)
    out = paged_prefill_attention(q, k, v, cache.k_cache, cache.v_cache, chunks, scale)
    ref = paged_prefill_attention_reference(q, k, v, cache.k_cache, cache.v_cache, chunks, scale)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **tolerances(dtype))


def test_prefill_last_row_equals_decode_of_the_same_sequence() -> None:
    # the two ops agree on what "the cache holds seq_len tokens" means
    cache, q, k, v, chunks, scale = prefill_case("smollm2-9q3kv-hd64", 16, torch.float32)
    last = [e - 1 for e in chunks.ends]
    lens = torch.tensor([c + e - s for s, e, c in zip(chunks.starts, chunks.ends, chunks.context_lens)])
    pre = paged_prefill_attention(q, k, v, cache.k_cache, cache.v_cache, chunks, scale)[last]
    dec = paged_decode_attention(q[last], cache.k_cache, cache.v_cache, chunks.block_tables, lens, scale)
    torch.testing.assert_close(dec, pre, **tolerances(torch.float32))


@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_torch_ops_ignore_what_the_padding_block_holds(op: str) -> None:
    outs = []
    for null in ("zeros", "garbage"):
        if op == "decode":
            cache, q, tables, lens, scale = decode_case("gqa4-8q2kv-hd32", 5, torch.float32)
            cache.set_null(null)
            outs.append(paged_decode_attention(q, cache.k_cache, cache.v_cache, tables, lens, scale))
        else:
            cache, q, k, v, chunks, scale = prefill_case("gqa4-8q2kv-hd32", 5, torch.float32)
            cache.set_null(null)
            outs.append(paged_prefill_attention(q, k, v, cache.k_cache, cache.v_cache, chunks, scale))
    assert torch.isfinite(outs[1]).all()
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_torch_ops_create_every_tensor_on_the_device_of_q() -> None:
    # The engine's meta-device test fails on any CPU tensor; here a CPU tensor mixed in would raise.
    H, Hkv, hd, bs, meta = 4, 2, 16, 4, torch.device("meta")
    k_cache = torch.empty(6, bs, Hkv, hd, device=meta)
    v_cache = torch.empty_like(k_cache)
    q = torch.empty(3, H, hd, device=meta)
    out = paged_decode_attention(q, k_cache, v_cache, torch.empty(3, 2, dtype=torch.int64, device=meta),
                                 torch.empty(3, dtype=torch.int64, device=meta), 0.25)
    assert out.device == meta and out.shape == (3, H, hd)
    chunks = PrefillChunks.build([0, 2], [2, 5], [0, 3], [[1], [2, 3]], device=meta)
    assert chunks.block_tables.device == meta and chunks.max_q_len == 3
    k = torch.empty(5, Hkv, hd, device=meta)
    out = paged_prefill_attention(torch.empty(5, H, hd, device=meta), k, k, k_cache, v_cache, chunks, 0.25)
    assert out.device == meta and out.shape == (5, H, hd)


def test_prefill_chunks_build_packs_host_lists_onto_the_device() -> None:
    chunks = PrefillChunks.build([0, 4, 5], [4, 5, 9], [0, 7, 2], [[3], [1, 2], [4]], device="cpu", pad_block=0)
    assert chunks.cu_q_lens.tolist() == [0, 4, 5, 9]
    assert chunks.context_lens_t.tolist() == [0, 7, 2]
    assert chunks.block_tables.tolist() == [[3, 0], [1, 2], [4, 0]]
    assert chunks.max_q_len == 4
    with pytest.raises(ValueError, match="back to back"):
        PrefillChunks.build([0, 5], [4, 9], [0, 0], [[1], [2]], device="cpu")


def test_ops_reject_heads_that_do_not_divide_into_kv_heads() -> None:
    cache, q, tables, lens, scale = decode_case("gqa4-8q2kv-hd32", 16, torch.float32)
    with pytest.raises(ValueError, match="divisible"):
        paged_decode_attention(q[:, :7], cache.k_cache[:, :, :2], cache.v_cache[:, :, :2], tables, lens, scale)


# ---------------------------------------------------------------------------------------------- Triton ops


@needs_triton
@ALL_DTYPES
@BLOCKS
@HEAD_CASES
def test_triton_decode_matches_reference(heads: str, block_size: int, dtype: torch.dtype) -> None:
    cache, q, tables, lens, scale = decode_case(heads, block_size, dtype, seed=1)
    out = triton_attention.paged_decode_attention_triton(q, cache.k_cache, cache.v_cache, tables, lens, scale)
    ref = paged_decode_attention_reference(q, cache.k_cache, cache.v_cache, tables, lens, scale)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **tolerances(dtype))


@needs_triton
@ALL_DTYPES
@BLOCKS
@HEAD_CASES
def test_triton_prefill_matches_reference_over_chunks_with_and_without_context(heads: str, block_size: int,
                                                                              dtype: torch.dtype) -> None:
    cache, q, k, v, chunks, scale = prefill_case(heads, block_size, dtype, seed=1)
    out = triton_attention.paged_prefill_attention_triton(q, k, v, cache.k_cache, cache.v_cache, chunks, scale)
    ref = paged_prefill_attention_reference(q, k, v, cache.k_cache, cache.v_cache, chunks, scale)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **tolerances(dtype))


@needs_triton
@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_triton_ops_ignore_what_the_padding_block_holds(op: str) -> None:
    outs = []
    for null in ("zeros", "garbage"):
        if op == "decode":
            cache, q, tables, lens, scale = decode_case("smollm2-9q3kv-hd64", 5, torch.float32)
            cache.set_null(null)
            outs.append(triton_attention.paged_decode_attention_triton(q, cache.k_cache, cache.v_cache, tables,
                                                                       lens, scale))
        else:
            cache, q, k, v, chunks, scale = prefill_case("smollm2-9q3kv-hd64", 5, torch.float32)
            cache.set_null(null)
            outs.append(triton_attention.paged_prefill_attention_triton(q, k, v, cache.k_cache, cache.v_cache,
                                                                        chunks, scale))
    assert torch.isfinite(outs[1]).all()
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@needs_triton
def test_triton_and_torch_prefill_agree_on_long_single_chunk_over_many_tiles() -> None:
    # 40 query rows after 37 context tokens: several query tiles, unmasked and diagonal key tiles
    cache, q, k, v, chunks, scale = prefill_case("gqa4-8q2kv-hd32", 16, torch.float32, specs=[(37, 40)], seed=3)
    out = triton_attention.paged_prefill_attention_triton(q, k, v, cache.k_cache, cache.v_cache, chunks, scale)
    fast = paged_prefill_attention(q, k, v, cache.k_cache, cache.v_cache, chunks, scale)
    torch.testing.assert_close(out, fast, **tolerances(torch.float32))
