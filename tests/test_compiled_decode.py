"""Decode steps through the compiled decoder layers (server.engine.compiled_decode) give the greedy
tokens of the eager step path, float32 and quantized, base model and LoRA adapters (through the C++
op, kernels.cpu_lora); steps with S²FT or routed experts decode eagerly.

The suite runs engines eagerly (tests/conftest.py sets TORCH_COMPILE_DISABLE=1: compiling costs
~10-20 s per engine); this module turns compilation back on for its own engines.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from loadtests.synthetic import mixlora_files, reclora_files, s2ft_files
from server.config import EngineConfig
from server.engine.compiled_decode import CompiledDecode
from kernels import cpu_lora
from server.engine.llm_engine import LLMEngine
from server.layers.context import ForwardContext
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
    eager, compiled, _ = float32
    assert eager.runner.graphs is None
    path = compiled.runner.graphs
    lora = {"LoRA batch 1", "LoRA batch >= 2"} if cpu_lora.get() is not None else set()
    assert set(path.graphs) == {"batch 1", "batch >= 2"} | lora and path.compile_seconds > 0
    assert path.describe().startswith("torch.compile")


@pytest.mark.parametrize("n", [1, 4])
def test_compiled_decode_equals_the_eager_step_path(float32, n):
    eager, compiled, seen = float32
    seen.clear()
    jobs = [(p, None) for p in PROMPTS[:n]]
    assert greedy_outputs(compiled, jobs, 16) == greedy_outputs(eager, jobs, 16)
    assert len(seen) >= 14 and set(seen) == {n}  # every decode step went through the compiled layers


LORA_JOBS = {"lora": ["r8-all"], "mixed-lora": ["r4-qv", None, "r16-attn", "r2-mlp"], "reclora": ["rec", None]}


@pytest.mark.parametrize("adapters", [*LORA_JOBS.values(), ["s2", "r8-all"], ["moe", None]],
                         ids=[*LORA_JOBS, "s2ft", "routed-experts"])
def test_steps_with_lora_adapters_compile_and_the_other_families_decode_eagerly(float32, adapters):
    eager, compiled, seen = float32
    seen.clear()
    jobs = list(zip(PROMPTS, adapters))
    assert greedy_outputs(compiled, jobs, 8) == greedy_outputs(eager, jobs, 8)
    if adapters in LORA_JOBS.values() and cpu_lora.get() is not None:
        assert len(seen) >= 6 and set(seen) == {len(jobs)}  # LoRA, RecLoRA users: through the compiled layers
    else:
        assert seen == []  # S²FT and routed experts (step hooks) decode eagerly


def test_lora_steps_compile_once_as_adapters_come_and_pools_grow(float32, tmp_path):
    from tests.test_dora import make_dora_adapter

    eager, compiled, seen = float32
    if cpu_lora.get() is None:
        pytest.skip("the C++ LoRA op could not be built here")
    jobs = [(PROMPTS[0], "r8-all"), (PROMPTS[1], None), (PROMPTS[2], "r2-mlp")]
    greedy_outputs(compiled, jobs, 6)
    compiled_before = counters["stats"]["unique_graphs"]
    for engine in (eager, compiled):  # the pools of every module grow (a bigger dynamic size, same code)
        space = engine.adapters.spaces["lora"]
        space.grow(space.units.capacity + 64)
    # an adapter of another pool space gives modules new pools (DoRA's here): the LoRA graph stays
    dora = make_dora_adapter(compiled.model_dir, tmp_path / "dora", 0, ["q_proj", "v_proj", "down_proj"])
    for engine in (eager, compiled):
        engine.load_adapter("dora", dora)
    seen.clear()
    jobs = [(PROMPTS[3] * 2, "r16-attn"), *jobs, (PROMPTS[0], "rec")]
    assert greedy_outputs(compiled, jobs, 10) == greedy_outputs(eager, jobs, 10)
    assert seen and counters["stats"]["unique_graphs"] == compiled_before


def _side_by_side(engine) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Patch the engine's compiled path to also run each of its steps eagerly on the same layout (first,
    so the compiled one writes the KV entries last), recording both steps' logits."""
    compiled, runner, pairs = engine.runner.graphs, engine.runner, []
    run = compiled.run

    def both(layout, fresh):
        runner.zero_blocks_now(torch.tensor(fresh, dtype=torch.long))
        ctx, step = runner.plan(layout)
        eager = runner.model.compute_logits(runner.forward(step, ctx))
        hidden = run(layout, fresh)
        pairs.append((eager, runner.model.compute_logits(hidden)))
        return hidden

    compiled.run = both
    return pairs


# w8a8 is the CPU's default base; int4 and int8 (each kernel its own branches) in make test-slow
@pytest.mark.parametrize("quantization", ["w8a8", pytest.param("int4", marks=pytest.mark.slow), pytest.param("int8", marks=pytest.mark.slow)])
def test_quantized_bases_compile_to_the_same_tokens(model_dir, adapter_dirs, quantization):
    """Weight-only int4/int8: the same greedy tokens. w8a8 quantizes each token's activations: a last-bit
    difference between fused and unfused float math moves an int8 code by one step where a value sits on
    a rounding boundary (and SmolLM2's massive activations make one step large), so two runs may part
    after a near-tie; for it every compiled step is compared with the eager step on the same layout."""
    eager, compiled = _engine(model_dir, adapter_dirs, quantization, True), _engine(model_dir, adapter_dirs, quantization, False)
    seen = _counting(compiled)
    # one sequence, and 8 (w8a8's int8 x int8 threshold on CPUs with VNNI: kernels.w8a8.ROWS_INT_MM), with LoRA adapters
    lora = cpu_lora.get() is not None
    batches = ([(PROMPTS[1], None)], [(p, None) for p in PROMPTS + PROMPTS[::-1]], list(zip(PROMPTS * 2, ["r8-all", None, "r4-qv", "rec"] * 2)))
    if quantization != "w8a8":
        for jobs in batches:
            assert greedy_outputs(compiled, jobs, 12) == greedy_outputs(eager, jobs, 12)
    else:
        pairs = _side_by_side(compiled)
        for jobs in batches:
            greedy_outputs(compiled, jobs, 12)
        assert len(pairs) >= 30
        for want, got in pairs:
            top2 = want.topk(2, dim=-1).values
            clear = (top2[:, 0] - top2[:, 1]) > 0.5  # rows without a near-tie pick the same token
            assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
            assert (got - want).abs().amax(-1).median() < 0.5
    assert set(seen) == {1, 8}
    # other batch sizes and table widths reuse the variants compiled at start-up: nothing compiles mid-serving
    compiled_before = counters["stats"]["unique_graphs"]
    greedy_outputs(compiled, [(p * 3, None) for p in PROMPTS[:3]] + [(PROMPTS[3], None)], 20)
    if lora:
        greedy_outputs(compiled, [(p * 2, a) for p, a in zip(PROMPTS, ["r16-attn", "r2-mlp", None])], 12)
    assert counters["stats"]["unique_graphs"] == compiled_before


def test_a_failed_compilation_falls_back_to_eager_decoding(float32, caplog):
    """E.g. no C++ compiler on the machine: the step still completes, later steps run eagerly."""
    eager, _, _ = float32
    path = CompiledDecode(eager.runner)

    def fails(*args):
        raise torch._dynamo.exc.TorchDynamoException("InvalidCxxCompiler: No working C++ compiler found")

    path.layer_step = fails
    runner, n = eager.runner, 3
    ids, pos = torch.tensor([1, 2, 3]), torch.zeros(n, dtype=torch.long)
    slots = torch.full((n,), runner.scratch_block * runner.block_size)
    tables, lens = torch.full((n, 2), runner.null_block), torch.ones(n, dtype=torch.long)
    with torch.inference_mode():
        got = path.forward(ids, pos, slots, tables, lens)
        ctx = ForwardContext(slot_mapping=slots, num_decode=n, decode_block_tables=tables, decode_seq_lens=lens)
        want = eager.model(ids, pos, ctx)
    torch.testing.assert_close(got, want)
    assert "No working C++ compiler" in caplog.text and path.describe().startswith("off: torch.compile failed")
    assert not path.fits(None, [])
