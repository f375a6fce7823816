"""Decode steps through decoder layers compiled by torch.compile (inductor's C++ backend), on the CPU.

On the CPU much of a small decode step is not arithmetic but the ~80 ATen calls per layer (norms,
rotary, SiLU x up, residual adds, views), each a few microseconds of dispatch, and the memory passes
between them. Inductor fuses the elementwise work into a few C++ loops and leaves the GEMMs to their
libraries. This is the CPU's counterpart of server.engine.decode_graphs (CUDA graphs).

What is compiled: one decoder layer's decode step, `_decode_layer`. All layers share its code
(torch.compile inlines nn.Modules and treats their weights as inputs: "regional compilation"), so the
trace and the C++ build happen once per variant rather than once per layer. A variant is fixed by what
the graph branches on: one sequence or several (dynamo specialises a size of 1) and the quantized
kernels' row thresholds (kernels.w8a8 ROWS_INT_MM on CPUs with VNNI, kernels.quant PACKED_MAX_ROWS).
Shapes are otherwise dynamic: any batch size, any block-table width (attention reads only the blocks
in use, unlike a CUDA graph's fixed width). The variants are compiled at start-up (`warm_up`).

Steps with LoRA adapters (plain LoRA, RecLoRA users, SG-LoRA's generated adapters: the LoRA pool
space, no step hooks) run through the same compiled layer, with their deltas computed by the C++
segmented op (kernels.cpu_lora, torch.ops.hotswap.lora_segments) that inductor calls as an opaque
in-place op: one call per module over per-step segment tables, so one graph serves every mix of
adapters. For that the LoRA pools of every module exist from start-up (AdapterManager.pools_everywhere)
and the tables are padded to at least two rows; a pool that grows changes only a dynamic size. Where
the op cannot be built, or the model is not float32, adapter steps decode eagerly. Steps with other
families (S²FT, DoRA, routed experts), prefill, mixed steps and speculative drafts run eagerly too.
`--enforce-eager` (or PyTorch's own TORCH_COMPILE_DISABLE=1) turns compilation off.
"""
from __future__ import annotations

import logging
import time
from functools import partial

import torch

from kernels import cpu_lora
from kernels.staging import HostStaging
from server.layers.context import ForwardContext
from server.models.modules import ADAPTER_MODULES

log = logging.getLogger(__name__)


def compile_disabled() -> bool:
    """Whether PyTorch's own switch (TORCH_COMPILE_DISABLE=1) turns torch.compile off in this process."""
    return bool(torch._dynamo.config.disable)


def _decode_layer(layer, x, positions, slots, tables, lens, segs=None):
    """One decoder layer over a decode-only step; `segs`: the LoRA segment tables (None: base model only)."""
    ctx = ForwardContext(slot_mapping=slots, num_decode=x.shape[0], decode_block_tables=tables, decode_seq_lens=lens, prefill=None,
                         lora_segs=segs)
    return layer(x, positions, ctx)


class CompiledDecode:
    """The runner's decode fast path on the CPU (the interface of DecodeGraphs: fits, run, describe)."""

    def __init__(self, runner):
        self.runner = runner
        # fullgraph: a graph break would silently run half of it eagerly; dynamic: one variant for every
        # batch size and table width (sizes 0 and 1 are still specialised by dynamo)
        self.layer_step = torch.compile(_decode_layer, fullgraph=True, dynamic=True)
        # Dynamo assumes that two sizes equal when first seen stay equal ("duck sizing"): a table width of 2
        # would be tied to an int4 weight's dimension of 2, and every other width would compile anew.
        torch.fx.experimental._config.use_duck_shape = False
        # Dynamo keeps the variants per code object, so every engine of the process shares _decode_layer's
        # (a server has one, a test process many): leave room for all of them.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.compile_seconds = 0.0  # start-up compilation (warm_up)
        self.graphs: dict[str, float] = {}  # variant -> seconds it took to compile at start-up
        self.failed: str | None = None  # why compilation failed (then every step runs eagerly)
        # LoRA steps too: the C++ op exists, computes in the model's float32 and reads the pools' dtype
        self.lora_space = runner.space_index("lora")
        self.lora = (runner.model.dtype == torch.float32 and runner.adapters.spaces["lora"].dtype in (torch.float32, torch.bfloat16)
                     and cpu_lora.get() is not None)
        if self.lora:
            runner.adapters.pools_everywhere("lora")

    def describe(self) -> str:
        if self.failed:
            return f"off: torch.compile failed ({self.failed}); decoding eagerly"
        variants = ", ".join(f"{name} in {seconds} s" for name, seconds in self.graphs.items())
        steps = "base-model and LoRA decode steps" if self.lora else "base-model decode steps"
        return f"torch.compile ({steps}): {variants}"

    def fits(self, layout, fresh: list[int]) -> bool:
        """Decode only (one token per sequence, every one samples), base-model and LoRA-space sequences."""
        if self.failed or layout.prefills or layout.num_drafts or not layout.decode_tables:
            return False
        if len(layout.sample_rows) != len(layout.decode_tables):  # a prompt's one-token chunk that does not sample yet
            return False
        if layout.num_adapters == 0:
            return True
        return self.lora and not layout.hooked and all(k[0] < 0 or (k[0] == self.lora_space and k[2] <= cpu_lora.MAX_RANK)
                                                       for k in layout.seg_keys)

    def run(self, layout, fresh: list[int]) -> torch.Tensor:
        """The hidden states (B, d) of the step's B sequences."""
        runner = self.runner
        # width >= 2: a width of 1 would be a variant of its own (dynamo specialises sizes of 1)
        n, width = len(layout.decode_tables), max(2, max(len(t) for t in layout.decode_tables))
        dev: dict[str, torch.Tensor] = {}
        staging = HostStaging(runner.device)
        for name, values in (("ids", layout.input_ids), ("pos", layout.positions), ("slots", layout.slots), ("lens", layout.decode_lens),
                             ("tables", [b for t in layout.decode_tables for b in t + [runner.null_block] * (width - len(t))]),
                             ("fresh", fresh)):  # fmt: skip
            staging.add(values, partial(dev.__setitem__, name))
        segs = self._segment_tables(layout) if layout.num_adapters else None
        for module, table in (segs or {}).items():
            staging.add(table, partial(dev.__setitem__, module))
        staging.upload()
        runner.zero_blocks_now(dev["fresh"])
        tables = {module: dev[module].view(-1, 4) for module in segs} if segs else None
        return self.forward(dev["ids"], dev["pos"], dev["slots"], dev["tables"].view(n, width), dev["lens"], tables)

    def _segment_tables(self, layout) -> dict[str, list[int]]:
        """Per module, the flat (tok_start, tok_end, row_start, rank) rows of the adapters that target it,
        padded with (0, 0, 0, 0) rows to at least two (dynamo specialises sizes 0 and 1: new variants)."""
        tables: dict[str, list[int]] = {module: [] for module in ADAPTER_MODULES}
        for t0, t1, key in zip(layout.seg_indptr, layout.seg_indptr[1:], layout.seg_keys):
            if key[0] == self.lora_space:
                for module in key[3] & tables.keys():
                    tables[module] += (t0, t1, key[1], key[2])
        for table in tables.values():
            table += [0] * max(0, 8 - len(table))
        return tables

    def forward(self, ids, positions, slots, tables, lens, segs=None) -> torch.Tensor:
        model = self.runner.model
        try:
            x = model.embed(ids)
            for layer in model.layers:
                x = self.layer_step(layer, x, positions, slots, tables, lens, segs)
        except torch._dynamo.exc.TorchDynamoException as e:
            # A variant that fails to compile (no C++ compiler, an inductor bug) is the server's problem,
            # not the step's: decode eagerly from now on. Layers that already ran rewrite the same keys.
            self.failed = (str(e).splitlines() or [type(e).__name__])[0][:200]
            log.warning("torch.compile failed (%s): decode steps run eagerly from now on", self.failed)
            self.layer_step = _decode_layer
            return self.forward(ids, positions, slots, tables, lens, segs)
        return model.norm(x)

    def warm_up(self, batch_sizes: tuple[int, ...]) -> None:
        """Compile the variants of these batch sizes now (a dummy step each, writing only the scratch
        block) rather than in a user's first request; records the time it takes."""
        runner = self.runner
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in batch_sizes:
                t = time.perf_counter()
                zeros = torch.zeros(b, dtype=torch.long, device=runner.device)
                tables = torch.full((b, 2), runner.null_block, dtype=torch.long, device=runner.device)
                self.forward(zeros, zeros, zeros + runner.scratch_block * runner.block_size, tables, zeros + 1)
                self.graphs["batch 1" if b == 1 else f"batch >= {b}"] = round(time.perf_counter() - t, 1)
                if self.lora:  # the LoRA variant: padding-only tables, no delta
                    t = time.perf_counter()
                    segs = {module: torch.zeros(2, 4, dtype=torch.long, device=runner.device) for module in ADAPTER_MODULES}
                    self.forward(zeros, zeros, zeros + runner.scratch_block * runner.block_size, tables, zeros + 1, segs)
                    self.graphs[("LoRA batch 1" if b == 1 else f"LoRA batch >= {b}")] = round(time.perf_counter() - t, 1)
        self.compile_seconds = time.perf_counter() - t0
