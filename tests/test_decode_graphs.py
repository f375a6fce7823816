"""Decode steps through the CUDA-graph path's static buffers (server.engine.decode_graphs).

The capture and replay themselves need CUDA; everything else runs here with `EagerBackend`, which
calls the same static-buffer forward pass (BGMV plans built from the buffers, padding rows writing
the scratch block) instead of replaying a graph: greedy tokens equal the ordinary step path's.
"""
from __future__ import annotations

import pytest
import torch

from loadtests.synthetic import s2ft_files
from server.config import EngineConfig
from server.engine.decode_graphs import DecodeGraphs, EagerBackend
from server.engine.llm_engine import LLMEngine
from tests.conftest import greedy_outputs

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time", "The best way to learn"]


@pytest.fixture(scope="module")
def engines(model_dir, adapter_dirs):
    def make():
        engine = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, adapters=dict(adapter_dirs), kv_cache_tokens=2048, max_num_seqs=8))
        cfg = engine.model.config
        engine.adapters.add(engine.parse_adapter(s2ft_files(cfg, torch.Generator().manual_seed(0), fraction=0.05), "s2"))
        return engine

    eager, graphed = make(), make()
    max_blocks = -(-graphed.max_model_len // graphed.config.block_size)
    graphs = DecodeGraphs(graphed.runner, 8, max_blocks, 64, EagerBackend(), progress=False)
    graphed.runner.graphs = graphs
    replayed = []
    run = graphs.run
    graphs.run = lambda layout, fresh: (replayed.append(len(layout.decode_tables)), run(layout, fresh))[1]
    return eager, graphed, replayed


@pytest.mark.parametrize("jobs", [
    [(PROMPTS[0], "r8-all")],
    [(p, a) for p, a in zip(PROMPTS, ["r4-qv", None, "r16-attn", "r2-mlp"])],  # mixed ranks and targets, base, padded to bucket 4
    [(p, a) for p in PROMPTS[:3] for a in ("r8-all", None)],  # 6 sequences: bucket 8, two padding rows
])
def test_decode_through_static_buffers_equals_the_step_path(engines, jobs):
    eager, graphed, replayed = engines
    replayed.clear()
    assert greedy_outputs(graphed, jobs, 20) == greedy_outputs(eager, jobs, 20)
    assert replayed and set(replayed) == {len(jobs)}  # every decode step went through the static buffers


def test_steps_the_graphs_cannot_hold_run_eagerly(engines):
    eager, graphed, replayed = engines
    replayed.clear()
    jobs = [(PROMPTS[0], "s2"), (PROMPTS[1], "r8-all")]  # an S²FT adapter: another pool space
    assert greedy_outputs(graphed, jobs, 6) == greedy_outputs(eager, jobs, 6)
    assert replayed == []


def test_reallocated_pools_turn_the_graphs_off(engines, caplog):
    eager, graphed, replayed = engines
    graphs = graphed.runner.graphs
    pools = graphed.adapters.spaces["lora"]
    pools.grow(pools.units.capacity * 2)  # the graphs would still read the old pools
    replayed.clear()
    jobs = [(PROMPTS[2], "r4-qv")]
    assert greedy_outputs(graphed, jobs, 6) == greedy_outputs(eager, jobs, 6)
    assert replayed == [] and graphs.graphs == {} and "reallocated" in caplog.text


def test_a_decode_row_that_does_not_sample_keeps_the_step_eager(engines):
    """A prompt given a single token that is not its last is laid out as a decode row but samples
    nothing: the graph path's rows-in-order sampling would pair tokens with the wrong requests."""
    from server.engine.model_runner import BASE_KEY, StepLayout

    _, graphed, _ = engines
    layout = StepLayout(input_ids=[1, 2], positions=[5, 9], slots=[5, 9], seg_indptr=[0, 2], seg_keys=[BASE_KEY],
                        decode_tables=[[0], [0]], decode_lens=[6, 10], sample_rows=[(1, 1)], sample_positions=[10])
    graphs = graphed.runner.graphs
    assert not graphs.fits(layout, [])
    layout.sample_rows, layout.sample_positions = [(0, 0), (1, 1)], [6, 10]
    assert graphs.fits(layout, []) or graphs.graphs == {}  # (turned off by the pool test if it ran first)
