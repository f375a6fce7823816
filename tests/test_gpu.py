"""The engine on a CUDA GPU: what the CPU suite only emulates (tests/test_triton_engine.py runs the
Triton kernels under TRITON_INTERPRET=1, tests/test_device_placement.py builds the engine on `meta`).

- float32, unquantized: greedy tokens equal HF transformers + peft on the same GPU, base and LoRA
  (the oracle of tests/test_oracle_parity.py);
- bfloat16 with a bf16, int8 or int4 base: the chat answer survives ("Paris");
- one batch of base + LoRA + a RecLoRA user + S²FT + routed experts equals each request served
  alone, with the Triton kernels and with the torch ops; requests decoded alone replay CUDA graphs;
- the KV cache sized from free GPU memory (kv_cache_tokens=None), on the device `hotswap serve
  --device cuda` builds (auto dtype, quantization and kernels).

Skipped without CUDA, so `make test` stays green on CPU machines. On a GPU the Triton kernels must be
compiled, not interpreted, and tests/conftest.py defaults TRITON_INTERPRET=1 for the CPU suite; so
this file runs on its own with TRITON_INTERPRET=0 (`make gpu-check` does):

    TRITON_INTERPRET=0 python -m pytest -q tests/test_gpu.py
"""
from __future__ import annotations

import gc
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: this suite runs on a CUDA machine (make gpu-check)", allow_module_level=True)

INTERPRETED = ("the Triton kernels would run in the interpreter (TRITON_INTERPRET=1, tests/conftest.py's default "
               "for the CPU suite): run TRITON_INTERPRET=0 python -m pytest tests/test_gpu.py on its own, or make gpu-check")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip(INTERPRETED, allow_module_level=True)

from loadtests.synthetic import s2ft_files  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.engine.llm_engine import LLMEngine  # noqa: E402
from tests.conftest import greedy_outputs  # noqa: E402
from tests.test_moe_lora import make_mixlora  # noqa: E402
from tests.test_oracle_parity import NEW_TOKENS, PROMPTS, _hf_model, _run_alone  # noqa: E402
from tests.test_reclora import make_reclora  # noqa: E402

ADAPTER_BUDGET = 256 * 2**20  # preallocated LoRA pools, as the server has: the graphs keep their addresses
# Engines start by autotuning the Triton kernels for every (rank, token) bucket they can meet: test
# engines meet few (short prompts, rank <= 32), so they declare small limits and start faster.
SMALL = {"max_num_batched_tokens": 256, "max_lora_rank": 32}
FAMILY_TOKENS = 8

pytestmark = pytest.mark.timeout(1200)  # the first engine of each dtype compiles and tunes every kernel


@pytest.fixture(scope="module", autouse=True)
def compiled_triton():
    """A module collected after this one may set TRITON_INTERPRET=1 (tests/test_triton_engine.py does),
    and a kernel module imported under it stays interpreted: skip rather than crawl."""
    autotune = sys.modules.get("kernels.triton.autotune")
    if os.environ.get("TRITON_INTERPRET") == "1" or getattr(autotune, "INTERPRET", False):
        pytest.skip(INTERPRETED)


def free_gpu() -> None:
    """Engines hold weights, pools, KV cache and graphs on the GPU: release them before the next is sized."""
    gc.collect()
    torch.cuda.empty_cache()


def cuda_engine(model_dir, **config) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model_dir, device="cuda", **config))


def chat_ids(engine: LLMEngine, question: str) -> list[int]:
    chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return engine.tokenizer(chat, add_special_tokens=False)["input_ids"]


# -- float32: the independent oracle -------------------------------------------------------------

@pytest.fixture(scope="module")
def fp32_engine(model_dir, adapter_dirs):
    engine = cuda_engine(model_dir, dtype="float32", quantization="none", adapters=dict(adapter_dirs), kv_cache_tokens=8192,
                         adapter_memory_bytes=ADAPTER_BUDGET, **SMALL)
    yield engine
    del engine
    free_gpu()


@pytest.mark.parametrize("adapter", [None, "r8-all", "r16-attn", "r8-rslora"])
def test_float32_greedy_tokens_equal_transformers_peft_on_the_gpu(fp32_engine, model_dir, adapter_dirs, adapter):
    assert fp32_engine.device.type == "cuda"
    hf = _hf_model(model_dir, adapter_dirs[adapter] if adapter else None).to("cuda")
    try:
        for prompt in PROMPTS:
            ids = fp32_engine.tokenizer(prompt, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                ref = hf.generate(ids.to("cuda"), max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1] :].tolist()
            assert _run_alone(fp32_engine, ids[0].tolist(), adapter) == ref, f"{adapter or 'base'}: {prompt!r}"
    finally:
        del hf
        free_gpu()


# -- bfloat16 bases: dense, int8 (Triton GEMM), int4 (tinygemm) ----------------------------------

@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_bfloat16_engine_answers_the_capital_of_france_with_each_base(model_dir, quantization):
    engine = cuda_engine(model_dir, dtype="bfloat16", quantization=quantization, kv_cache_tokens=2048, **SMALL)
    try:
        assert (engine.device.type, engine.dtype_name, engine.quantization) == ("cuda", "bfloat16", quantization)
        answer = engine.tokenizer.decode(_run_alone(engine, chat_ids(engine, "What is the capital of France?"), None, max_tokens=10))
        assert "Paris" in answer, f"{quantization}: {answer!r}"
    finally:
        del engine
        free_gpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_perplexity_bound_of_the_gpu_bases(model_dir, dtype):
    """The CPU suite's bound (tests/test_quantization.py) on the GPU kernels: int8 (Triton GEMM) and
    int4 (tinygemm) within +3 % of the dense model, on the same 512 tokens."""
    from transformers import AutoTokenizer

    from server.models.loader import load_model
    from server.models.perplexity import perplexity
    from server.models.quantize import quantize_model
    from tests.test_quantization import _text_ids

    ids = _text_ids(AutoTokenizer.from_pretrained(str(model_dir)), 512)
    ppl = {}
    for mode in ("none", "int8", "int4"):
        model = load_model(model_dir, dtype, 512, progress=False)
        quantize_model(model, mode, 32, progress=False, device=torch.device("cuda"))
        ppl[mode] = perplexity(model.to("cuda"), ids)
        del model
        free_gpu()
    assert 20 < ppl["none"] < 200, ppl
    for mode in ("int8", "int4"):
        assert ppl[mode] <= ppl["none"] * 1.03, ppl


# -- every family in one batch -------------------------------------------------------------------

def count_graph_replays(engine: LLMEngine) -> list[int]:
    """The batch size of every decode step replayed from a CUDA graph from now on."""
    graphs = engine.runner.graphs
    assert graphs is not None, "no decode graphs on CUDA without enforce_eager"
    replays: list[int] = []
    run = graphs.run

    def counted(layout, *args, **kwargs):
        replays.append(len(layout.decode_tables))
        return run(layout, *args, **kwargs)

    graphs.run = counted
    return replays


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_every_family_in_one_batch_equals_each_request_alone(model_dir, adapter_dirs, kernels):
    """float32, so that a different batch shape (another GEMM tiling) cannot flip a near-tied greedy
    token; the batch holds S²FT and routed experts, so its decode steps run eagerly, while base, LoRA
    and RecLoRA requests alone replay graphs: the comparison also covers graph against eager."""
    engine = cuda_engine(model_dir, dtype="float32", quantization="none", kernels=kernels, adapters={"lora": adapter_dirs["r8-all"]},
                         kv_cache_tokens=8192, adapter_memory_bytes=ADAPTER_BUDGET, max_num_seqs=16, **SMALL)
    try:
        assert engine.model.layers[0].attn.kernels.name == kernels
        cfg, dtype = engine.model.config, engine.model.dtype
        bank = engine.parse_adapter(make_reclora(cfg)[0], "rec")
        engine.adapters.add(bank.personalize("rec-alice", {"weights": [0.7, 0.1, 0.1, 0.1]}, dtype))
        engine.adapters.add(engine.parse_adapter(s2ft_files(cfg, torch.Generator().manual_seed(0), fraction=0.05), "s2"))
        engine.adapters.add(engine.parse_adapter(make_mixlora(cfg, "top_k", 2)[0], "moe"))
        replays = count_graph_replays(engine)

        jobs = [(prompt, adapter) for prompt in PROMPTS[:2] for adapter in (None, "lora", "rec-alice", "s2", "moe")]
        together = greedy_outputs(engine, jobs, FAMILY_TOKENS)
        alone = [greedy_outputs(engine, [job], FAMILY_TOKENS)[0] for job in jobs]
        assert all(len(out) == FAMILY_TOKENS for out in together)
        for job, a, b in zip(jobs, together, alone):
            assert a == b, f"{job[1] or 'base'} on {job[0]!r}: batched {a} != alone {b}"
        assert replays, "no decode step was replayed from a CUDA graph"
    finally:
        del engine
        free_gpu()


# -- what `hotswap serve --device cuda` builds ----------------------------------------------------

def test_kv_cache_sized_from_free_gpu_memory(model_dir):
    """Every other setting at its default: the full start-up of a served engine."""
    free_gpu()
    utilization = 0.5  # not the default 0.9: leave room for whatever else shares the GPU
    engine = cuda_engine(model_dir, kv_cache_tokens=None, gpu_memory_utilization=utilization)
    try:
        assert engine.device.type == "cuda"
        assert engine.quantization == "int8"  # auto on CUDA
        kv_tokens = engine.block_manager.num_blocks * engine.config.block_size
        assert kv_tokens > 0
        assert 0 < engine.runner.kv_cache_bytes <= utilization * torch.cuda.get_device_properties(engine.device).total_memory
        answer = engine.tokenizer.decode(_run_alone(engine, chat_ids(engine, "What is the capital of France?"), None, max_tokens=10))
        assert "Paris" in answer, answer
    finally:
        del engine
        free_gpu()
