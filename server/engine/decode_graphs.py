"""Decode steps replayed from CUDA graphs, one per batch-size bucket, captured at start-up.

A decode step's kernels are the same every step for a given batch size; launching them one by one
costs more than their work for small models and batches. So (as vLLM and SGLang do) each bucket's
forward pass is captured once over static buffers and replayed: a step writes its token ids,
positions, KV slots, block tables, lengths and each module's per-token adapter rows into one host
array, copies it into the static device buffer in one transfer, clears fresh KV blocks, and replays.

What a graph can replay: decode-only steps (one new token per sequence) of the base model and of
LoRA-space adapters (LoRA, RecLoRA users, SG-LoRA), whose deltas go through BGMV with per-token rows
(kernels.make_bgmv_plan) — no host data inside the graph. Prefill and mixed steps, and steps holding
adapters of other pool spaces (S²FT, DoRA) or with step hooks (routed experts), run eagerly.
Padding rows of a bucket write their keys into a scratch KV block and read the null block.

The graphs hold the addresses of the KV cache and of the LoRA pools: those are allocated before
capture (on CUDA the LoRA pools are preallocated to the adapter budget) and a pool that is replaced
or added later turns the graphs off (`fits` is then always False, with a warning).

`GraphBackend` hides CUDA: `CudaGraphBackend` captures and replays; `EagerBackend` runs the same
static-buffer forward pass without a graph (the CPU test of everything but the capture).
"""
from __future__ import annotations

import logging
from array import array
from collections.abc import Callable
from typing import Protocol

import torch
from tqdm import tqdm

from kernels import make_bgmv_plan
from server.families.registry import SPACES
from server.layers.context import ForwardContext
from server.models.modules import ADAPTER_MODULES

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class GraphBackend(Protocol):
    def capture(self, forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """A callable that runs `forward` again (over the same static buffers) and returns its output."""
        ...


class EagerBackend:
    def capture(self, forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        return forward


class CudaGraphBackend:
    """torch.cuda.CUDAGraph per bucket, all in one memory pool (captured largest first, so the smaller
    ones reuse its blocks)."""

    def __init__(self, device: torch.device):
        self.device, self.pool = device, None

    def capture(self, forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm up off the capture: Triton autotuning, allocator growth
            forward()
            forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = forward()
        self.pool = graph.pool()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay


class DecodeGraphs:
    def __init__(self, runner, max_seqs: int, max_blocks: int, max_rank: int, backend: GraphBackend, progress: bool = True):
        self.runner, self.max_rank = runner, max_rank
        self.max_seqs, self.max_blocks = max_seqs, max_blocks
        self.buckets = sorted({b for b in BUCKETS if b < max_seqs} | {max_seqs})
        self.lora_space = SPACES["lora"]
        self.space_index = runner.space_index("lora")
        self.pools = runner.adapters.spaces["lora"]
        B, W, M = max_seqs, max_blocks, len(ADAPTER_MODULES)
        fields = {"ids": B, "pos": B, "slots": B, "lens": B, "tables": B * W, "rows": M * B, "ranks": M * B, "fresh": B}
        self.at, total = {}, 0
        for name, n in fields.items():
            self.at[name] = (total, total + n)
            total += n
        self.static = torch.zeros(total, dtype=torch.long, device=runner.device)
        self.defaults = self._defaults(total)
        self.generation = self.pools.generation  # the LoRA pools the graphs read; any change turns them off
        self.graphs = {}
        with torch.inference_mode():
            for b in tqdm(sorted(self.buckets, reverse=True), desc="Capturing decode graphs", unit="graph", disable=not progress, leave=False):
                self.graphs[b] = backend.capture(lambda b=b: self._forward(b))

    def _view(self, name: str) -> torch.Tensor:
        lo, hi = self.at[name]
        return self.static[lo:hi]

    def _defaults(self, total: int) -> array:
        """What padding rows hold: token 0 at position 0 writing the scratch slot, attending to the null
        block's first (zero) key, no adapter."""
        host = array("q", bytes(8 * total))
        bs, r = self.runner.block_size, self.runner
        for name, value in (("slots", r.scratch_block * bs), ("lens", 1), ("tables", r.null_block), ("rows", -1)):
            lo, hi = self.at[name]
            host[lo:hi] = array("q", [value]) * (hi - lo)
        return host

    def _forward(self, b: int) -> torch.Tensor:
        B, W = self.max_seqs, self.max_blocks
        rows, ranks = self._view("rows").view(-1, B), self._view("ranks").view(-1, B)
        plans = {module: make_bgmv_plan(rows[m, :b], ranks[m, :b], self.max_rank) for m, module in enumerate(ADAPTER_MODULES)}
        ctx = ForwardContext(slot_mapping=self._view("slots")[:b], num_decode=b, decode_block_tables=self._view("tables").view(B, W)[:b],
                             decode_seq_lens=self._view("lens")[:b], prefill=None, plans={self.lora_space: plans}, hooks=[])  # fmt: skip
        return self.runner.model(self._view("ids")[:b], self._view("pos")[:b], ctx)

    def describe(self) -> str:
        return f"CUDA graphs: {len(self.graphs)} captured"

    def fits(self, layout, fresh: list[int]) -> bool:
        """Whether a step can be replayed: decode only, at most max_seqs sequences and max_blocks blocks
        each, base or LoRA-space adapters of rank <= max_rank, no step hook, pools unchanged."""
        if self.pools.generation != self.generation:
            if self.graphs:
                log.warning("the LoRA pools were reallocated after the decode graphs were captured: decoding eagerly from now on")
                self.graphs = {}
            return False
        if layout.prefills or layout.hooked or not layout.decode_tables or len(layout.decode_tables) > self.max_seqs:
            return False
        if len(layout.sample_rows) != len(layout.decode_tables):  # a prompt's one-token chunk that does not sample yet
            return False
        if len(fresh) > self.max_seqs or max(len(t) for t in layout.decode_tables) > self.max_blocks:
            return False
        return all(k[0] < 0 or (k[0] == self.space_index and k[2] <= self.max_rank) for k in layout.seg_keys)

    def run(self, layout, fresh: list[int]) -> torch.Tensor:
        """The hidden states of the step's n sequences (n, d), from the smallest bucket that holds them."""
        n = len(layout.decode_tables)
        b = next(size for size in self.buckets if size >= n)
        host = array("q", self.defaults)
        for name, values in (("ids", layout.input_ids), ("pos", layout.positions), ("slots", layout.slots), ("lens", layout.decode_lens),
                             ("fresh", fresh)):  # fmt: skip
            lo = self.at[name][0]
            host[lo:lo + len(values)] = array("q", values)
        lo = self.at["tables"][0]
        for i, table in enumerate(layout.decode_tables):
            host[lo + i * self.max_blocks:lo + i * self.max_blocks + len(table)] = array("q", table)
        rows, ranks = self.at["rows"][0], self.at["ranks"][0]
        for (t0, t1), key in zip(zip(layout.seg_indptr, layout.seg_indptr[1:]), layout.seg_keys):
            if key[0] < 0:
                continue
            for m, module in enumerate(ADAPTER_MODULES):
                if module in key[3]:
                    base = m * self.max_seqs
                    host[rows + base + t0:rows + base + t1] = array("q", [key[1]]) * (t1 - t0)
                    host[ranks + base + t0:ranks + base + t1] = array("q", [key[2]]) * (t1 - t0)
        self.runner.upload_into(self.static, host)
        self.runner.zero_blocks_now(self._view("fresh")[:len(fresh)])
        return self.graphs[b]()[:n]
