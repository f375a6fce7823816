"""Decode steps through the compiled decoder layers (server.engine.compiled_decode) give the greedy
tokens of the eager step path: base and every adapter family, float32 and the quantized bases.

The suite runs engines eagerly (tests/conftest.py sets TORCH_COMPILE_DISABLE=1: compiling costs
~10-20 s per engine); this module turns compilation back on for its own engines.
"""
from __future__ import annotations

import pytest
import torch

from loadtests.synthetic import mixlora_files, reclora_files, s2ft_files
from server.config import EngineConfig
from server.engine.compiled_decode import CompiledDecode
from server.engine.llm_engine import LLMEngine
from tests.conftest import greedy_outputs

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time", "The best way to learn"]


@pytest.fixture(scope="module", autouse=True)
def compiling():
    with torch._dynamo.config.patch(disable=False):
        yield


def _engine(model_dir, adapter_dirs, quantization: str, eager: bool) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=model_dir, adapters=dict(adapter_dirs), kv_cache_tokens=2048, max_num_seqs=8,
                                    quantization=quantization, enforce_eager=eager))  # fmt: skip
    cfg, g = engine.model.config, torch.Generator().manual_seed(0)
    for name, files in (("s2", s2ft_files(cfg, g, fraction=0.05)), ("moe", mixlora_files(cfg, g, experts=2, top_k=1))):
        engine.adapters.add(engine.parse_adapter(files, name))
    # a RecLoRA user's mixture (here the uniform one of a user without state) is served as a LoRA
    engine.adapters.add(engine.parse_adapter(reclora_files(cfg, g, k=4), "rec").personalize("rec", None, engine.model.dtype))
    return engine


def _counting(engine) -> list[int]:
    """Patch the engine's compiled path to record the batch size of every step it runs."""
    compiled, seen = engine.runner.graphs, []
    assert isinstance(compiled, CompiledDecode)
    run = compiled.run
    compiled.run = lambda layout, fresh: (seen.append(len(layout.decode_tables)), run(layout, fresh))[1]
    return seen


@pytest.fixture(scope="module")
def float32(model_dir, adapter_dirs):
    eager, compiled = _engine(model_dir, adapter_dirs, "none", True), _engine(model_dir, adapter_dirs, "none", False)
    return eager, compiled, _counting(compiled)


def test_start_up_compiles_and_reports_the_time(float32):
    _, compiled, _ = float32
    path = compiled.runner.graphs
    assert set(path.graphs) == {"base x1", "base x2"} and path.compile_seconds > 0
    assert "torch.compile" in path.describe()


@pytest.mark.parametrize("jobs", [
    [(PROMPTS[0], None)],  # one sequence: its own variant
    [(PROMPTS[0], "r8-all")],
    [(p, a) for p, a in zip(PROMPTS, ["r4-qv", None, "r16-attn", "r2-mlp"])],  # mixed ranks and targets, and the base
    [(p, a) for p in PROMPTS[:3] for a in ("r32-q", "rec")],  # RecLoRA next to LoRA
], ids=["base-1", "lora-1", "mixed-4", "lora+reclora-6"])
def test_compiled_decode_equals_the_eager_step_path(float32, jobs):
    eager, compiled, seen = float32
    seen.clear()
    assert greedy_outputs(compiled, jobs, 16) == greedy_outputs(eager, jobs, 16)
    assert seen and set(seen) == {len(jobs)}  # every decode step went through the compiled layers


@pytest.mark.parametrize("family", ["s2", "moe"])  # S²FT: another pool space; routed experts: step hooks
def test_steps_with_other_pool_spaces_or_hooks_run_eagerly(float32, family):
    eager, compiled, seen = float32
    seen.clear()
    jobs = [(PROMPTS[0], family), (PROMPTS[1], "r8-all")]
    assert greedy_outputs(compiled, jobs, 6) == greedy_outputs(eager, jobs, 6)
    assert seen == []


@pytest.mark.parametrize("quantization", ["w8a8", "int8"])
def test_quantized_bases_compile_to_the_same_tokens(model_dir, adapter_dirs, quantization):
    eager, compiled = _engine(model_dir, adapter_dirs, quantization, True), _engine(model_dir, adapter_dirs, quantization, False)
    seen = _counting(compiled)
    # one sequence, and 8: from w8a8's int8 x int8 threshold on (kernels.w8a8.ROWS_INT_MM, on CPUs with VNNI)
    for jobs in ([(PROMPTS[1], "r16-attn")], [(p, a) for p in PROMPTS for a in ("r4-qv", None)]):
        assert greedy_outputs(compiled, jobs, 12) == greedy_outputs(eager, jobs, 12)
    assert set(seen) == {1, 8}
