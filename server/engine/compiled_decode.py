"""Decode steps through decoder layers compiled by torch.compile (inductor's C++ backend), on the CPU.

On the CPU the cost of a small decode step is not the arithmetic but the ~80 ATen calls per layer
(norms, rotary, SiLU x up, residual adds, views), each a few microseconds of dispatch, and the
memory passes between them. Inductor fuses the elementwise work into a few C++ loops and leaves the
GEMMs to their libraries. This is the CPU's counterpart of server.engine.decode_graphs (CUDA graphs).

What is compiled: one decoder layer's decode step, `_decode_layer`, with the LoRA-space adapter deltas
inside it (BGMV from per-token pool rows, kernels.make_bgmv_plan: device tensors only, so one graph
serves every mix of adapters). All 30 layers share its code (torch.compile inlines nn.Modules and
treats their weights as inputs, "regional compilation"), so the trace and C++ build happen once per
variant rather than once per layer. A variant is fixed by what the graph branches on: one sequence
or several (batch size 1 is specialised), the quantized kernel's row threshold (kernels.w8a8
ROWS_INT_MM, kernels.quant PACKED_MAX_ROWS), and the set of modules that carry adapters in the step.
Shapes are otherwise dynamic: any batch size, any block-table width (attention reads only the blocks
in use, unlike a CUDA graph's fixed width). The common variants are compiled at start-up (`warm_up`);
others on first use.

What runs eagerly, as before: prefill and mixed steps, drafts of speculative decoding, and steps with
adapters of other pool spaces (S²FT, DoRA) or step hooks (routed experts). `--enforce-eager` (or
PyTorch's own TORCH_COMPILE_DISABLE=1) turns compilation off.
"""
from __future__ import annotations

import logging
import time

import torch

from kernels import make_bgmv_plan
from kernels.staging import HostStaging
from server.families.registry import SPACES
from server.layers.context import ForwardContext
from server.models.modules import ADAPTER_MODULES

log = logging.getLogger(__name__)


def compile_disabled() -> bool:
    """Whether PyTorch's own switch (TORCH_COMPILE_DISABLE=1) turns torch.compile off in this process."""
    return bool(torch._dynamo.config.disable)


def _decode_layer(layer, x, positions, slots, tables, lens, rows, ranks, targets: tuple[str, ...], space, max_rank: int):
    """One decoder layer over a decode-only step; rows/ranks [len(targets), B]: each token's LoRA pool
    rows per targeted module (-1: none)."""
    plans = {module: make_bgmv_plan(rows[m], ranks[m], max_rank) for m, module in enumerate(targets)}
    ctx = ForwardContext(slot_mapping=slots, num_decode=x.shape[0], decode_block_tables=tables, decode_seq_lens=lens,
                         prefill=None, plans={space: plans} if plans else {}, hooks=[])  # fmt: skip
    return layer(x, positions, ctx)


class CompiledDecode:
    """The runner's decode fast path on the CPU (same interface as DecodeGraphs: fits, run)."""

    def __init__(self, runner, max_rank: int):
        self.runner, self.max_rank = runner, max_rank
        self.space = SPACES["lora"]
        self.space_index = runner.space_index("lora")
        # fullgraph: a graph break would silently run half of it eagerly; dynamic: one variant for every
        # batch size and table width (sizes 0 and 1 are still specialised by dynamo)
        self.layer_step = torch.compile(_decode_layer, fullgraph=True, dynamic=True)
        # Dynamo assumes that two sizes equal when first seen stay equal ("duck sizing"): a table width of 2
        # would be tied to an int4 weight's dimension of 2, and every other width would compile anew.
        torch.fx.experimental._config.use_duck_shape = False
        # Variants are few (see the module docstring) but the layer code is one: leave room for all of them.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.compile_seconds = 0.0  # start-up compilation (warm_up)
        self.graphs: dict = {}  # for /health: the variants compiled at start-up

    def describe(self) -> str:
        variants = ", ".join(f"{name} ({seconds} s)" for name, seconds in self.graphs.items())
        return f"torch.compile: compiled at start-up in {self.compile_seconds:.1f} s: {variants}; others on first use"

    def fits(self, layout, fresh: list[int]) -> bool:
        """Decode only (one token per sequence, every one samples), no step hook, base or LoRA-space
        adapters of rank <= max_rank."""
        if layout.prefills or layout.hooked or layout.num_drafts or not layout.decode_tables:
            return False
        if len(layout.sample_rows) != len(layout.decode_tables):  # a prompt's one-token chunk that does not sample yet
            return False
        return all(k[0] < 0 or (k[0] == self.space_index and k[2] <= self.max_rank) for k in layout.seg_keys)

    def run(self, layout, fresh: list[int]) -> torch.Tensor:
        """The hidden states (B, d) of the step's B sequences."""
        runner, model = self.runner, self.runner.model
        targets = tuple(m for m in ADAPTER_MODULES if any(k[0] >= 0 and m in k[3] for k in layout.seg_keys))
        # width >= 2: a width of 1 would be a variant of its own (dynamo specialises sizes of 1)
        n, width = len(layout.decode_tables), max(2, max(len(t) for t in layout.decode_tables))
        rows, ranks = [-1] * (len(targets) * n), [0] * (len(targets) * n)
        for (t0, t1), key in zip(zip(layout.seg_indptr, layout.seg_indptr[1:]), layout.seg_keys):
            for m, module in enumerate(targets):
                if key[0] >= 0 and module in key[3]:
                    rows[m * n + t0:m * n + t1] = [key[1]] * (t1 - t0)
                    ranks[m * n + t0:m * n + t1] = [key[2]] * (t1 - t0)
        dev: dict[str, torch.Tensor] = {}
        staging = HostStaging(runner.device)
        for name, values in (("ids", layout.input_ids), ("pos", layout.positions), ("slots", layout.slots), ("lens", layout.decode_lens),
                             ("tables", [b for t in layout.decode_tables for b in t + [runner.null_block] * (width - len(t))]),
                             ("rows", rows), ("ranks", ranks), ("fresh", fresh)):  # fmt: skip
            staging.add(values, lambda t, name=name: dev.__setitem__(name, t))
        staging.upload()
        runner.zero_blocks_now(dev["fresh"])
        return self.forward(dev["ids"], dev["pos"], dev["slots"], dev["tables"].view(n, width), dev["lens"],
                            dev["rows"].view(len(targets), n), dev["ranks"].view(len(targets), n), targets)

    def forward(self, ids, pos, slots, tables, lens, rows, ranks, targets: tuple[str, ...]) -> torch.Tensor:
        model = self.runner.model
        x = model.embed(ids)
        for layer in model.layers:
            x = self.layer_step(layer, x, pos, slots, tables, lens, rows, ranks, targets, self.space, self.max_rank)
        return model.norm(x)

    def warm_up(self, batch_sizes: tuple[int, ...], progress: bool = True) -> None:
        """Compile the base-model variants of these batch sizes now (a dummy step each, writing only the
        scratch block) rather than in a user's first request; records compile_seconds."""
        runner = self.runner
        t0 = time.perf_counter()
        scratch = runner.scratch_block * runner.block_size
        with torch.inference_mode():
            for b in batch_sizes:
                t = time.perf_counter()
                zeros = torch.zeros(b, dtype=torch.long, device=runner.device)
                tables = torch.full((b, 2), runner.null_block, dtype=torch.long, device=runner.device)
                empty = torch.zeros((0, b), dtype=torch.long, device=runner.device)
                self.forward(zeros, zeros, zeros + scratch, tables, zeros + 1, empty, empty, ())
                self.graphs[f"base x{b}"] = round(time.perf_counter() - t, 1)
                if progress:
                    log.info("compiled the decode step for %d sequence(s) in %.1f s", b, time.perf_counter() - t)
        self.compile_seconds = time.perf_counter() - t0
