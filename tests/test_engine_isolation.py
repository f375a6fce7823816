"""A failure that belongs to one request fails that request only.

The other requests of the same batches finish with the tokens they get alone, and nothing the
failed request leaves behind (NaN in the KV blocks it wrote, which go to other sequences next)
reaches anybody else. Bad adapters are placed directly in the engine here, past the upload
validation that would refuse them, as a stand-in for any numerical blow-up or kernel failure.
"""
from __future__ import annotations

import math

import pytest
import torch

from server.config import EngineConfig
from server.engine.sampler import NON_FINITE, sample
from server.engine.sequence import SamplingParams, Sequence
from server.families.registry import parse_adapter
from server.lora.peft import read_adapter_files
from tests.conftest import greedy_outputs

GOOD_JOBS = [("The capital of France is", "r4-qv"), ("1, 2, 3, 4,", None), ("def add(a, b):", "r8-all")]
LONG_PROMPT = "Once upon a time, in a land far away, there lived a curious fox. " * 8


@pytest.fixture(scope="module")
def small_engine(model_dir, adapter_dirs):
    """32 KV blocks, so the blocks of a failed sequence are soon handed to the next ones."""
    from server.engine.llm_engine import LLMEngine

    adapters = {k: adapter_dirs[k] for k in ("r4-qv", "r8-all")}
    return LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, adapters=adapters, kv_cache_tokens=512, served_model_name="smollm2"))


def place_static(engine, weights) -> None:
    engine.adapters.add(weights, pinned=True)
    engine.static_adapters.add(weights.name)


def nan_adapter(engine, adapter_dir, name: str):
    """A LoRA whose B is NaN: every token that goes through it turns NaN (v_proj -> attention -> residual)."""
    weights = parse_adapter(read_adapter_files(adapter_dir, name), name, engine.model.config, engine.model.dtype, 64)
    weights.modules = {key: (a, torch.full_like(b, math.nan), s) for key, (a, b, s) in weights.modules.items()}
    return weights


def run_together(engine, jobs, max_tokens: int) -> list[Sequence]:
    seqs = [Sequence(engine.tokenizer(p)["input_ids"], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), a) for p, a in jobs]
    for s in seqs:
        engine.add(s)
    while engine.has_work():
        engine.step()
    return seqs


def test_a_request_whose_numbers_blow_up_fails_alone_and_poisons_no_later_request(small_engine, adapter_dirs):
    engine = small_engine
    if "nan" not in engine.static_adapters:
        place_static(engine, nan_adapter(engine, adapter_dirs["r4-qv"], "nan"))
    alone = [greedy_outputs(engine, [job], 12)[0] for job in GOOD_JOBS]

    # the NaN request is admitted first, so it holds the lowest blocks (block 0 padded decode tables before)
    seqs = run_together(engine, [(LONG_PROMPT, "nan"), *GOOD_JOBS], 12)
    bad, good = seqs[0], seqs[1:]
    assert bad.finish_reason == "error" and str(bad.error) == NON_FINITE and not bad.output_token_ids
    assert [s.output_token_ids for s in good] == alone

    # The failed sequence's blocks are back in the free list with NaN in them ...
    v0 = engine.model.layers[0].attn.v_cache
    poisoned = {b for b in range(engine.block_manager.num_blocks) if v0[b].isnan().any()}
    assert poisoned, "the NaN request should have written NaN values into its KV blocks"
    # ... and the next requests, which are handed those blocks, are not affected.
    handed_out: list[int] = []
    take_fresh = engine.block_manager.take_fresh

    def recording_take_fresh():
        fresh = take_fresh()
        handed_out.extend(fresh)
        return fresh

    engine.block_manager.take_fresh = recording_take_fresh
    try:
        second = run_together(engine, [(LONG_PROMPT, "r4-qv"), *GOOD_JOBS, (LONG_PROMPT, None)], 12)
    finally:
        del engine.block_manager.take_fresh
    assert poisoned & set(handed_out), "the second wave should reuse the failed request's blocks"
    assert [s.output_token_ids for s in second[1:4]] == alone
    assert all(s.finish_reason == "length" for s in second)


def test_an_exception_in_one_adapters_kernel_path_fails_only_its_requests(small_engine, tmp_path):
    from tests.test_moe_lora import make_mixlora, write

    engine = small_engine
    alone = [greedy_outputs(engine, [job], 8)[0] for job in GOOD_JOBS]
    files, _ = make_mixlora(engine.model.config, "top_k", 2)
    engine.load_adapter("broken-experts", write(files, tmp_path / "experts"))
    # a router of the wrong shape: routing this adapter's tokens raises inside the forward pass
    engine.adapters.get("broken-experts").weights.routers[3] = torch.zeros(4, 7)

    seqs = run_together(engine, [("Tell me a story", "broken-experts"), *GOOD_JOBS], 8)
    assert seqs[0].finish_reason == "error" and "engine failed" in str(seqs[0].error) and seqs[0].error.status == 500
    assert [s.output_token_ids for s in seqs[1:]] == alone


def test_an_adapter_larger_than_the_whole_device_budget_fails_alone(small_engine, adapter_dirs):
    engine = small_engine
    weights = parse_adapter(read_adapter_files(adapter_dirs["r8-all"], "big"), "big", engine.model.config, engine.model.dtype, 64)
    alone = greedy_outputs(engine, [GOOD_JOBS[1]], 8)[0]
    budget = engine.adapters.budget_bytes
    engine.adapters.budget_bytes = 4 * engine.adapters.row_bytes  # less than its 8 rank-rows
    try:
        ids = engine.tokenizer("Hello there")["input_ids"]
        big = Sequence(ids, SamplingParams(max_tokens=8, temperature=0.0), "tenant/big@v1", adapter_weights=weights)
        base = Sequence(engine.tokenizer(GOOD_JOBS[1][0])["input_ids"], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        for s in (big, base):
            engine.add(s)
        while engine.has_work():
            engine.step()
    finally:
        engine.adapters.budget_bytes = budget
    assert big.finish_reason == "error" and big.error.status == 400 and big.error.code == "adapter_too_large"
    assert base.output_token_ids == alone
    assert engine.adapters.get("tenant/big@v1") is None


def test_sampling_fails_only_rows_whose_logits_are_not_finite():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    logits[1, 7] = math.nan
    logits[2, 3] = math.inf
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0), SamplingParams(temperature=0.8), SamplingParams(temperature=0.8, top_p=1e-300, seed=1)]
    tokens = sample(logits, params, [5, 5, 5, 5]).tolist()
    assert tokens[1] == tokens[2] == -1  # -1: the row cannot be sampled (the model runner reports NON_FINITE)
    assert tokens[0] == int(logits[0].argmax())
    assert tokens[3] == int(logits[3].argmax())  # top_p below float32's range keeps the top token, and only it


@pytest.mark.parametrize(
    "field, value",
    [("seed", 2**64), ("seed", -(2**63) - 1), ("temperature", 1e-40), ("temperature", math.inf), ("temperature", math.nan),
     ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("max_tokens", 0)],
)
def test_sampling_params_refuse_values_that_would_fail_a_step(field, value):
    with pytest.raises(ValueError):
        SamplingParams(**{field: value})


def test_with_speculative_decoding_a_blown_up_request_still_fails_alone(small_engine, adapter_dirs):
    """Drafts on (three good sequences draft and verify in the same steps as the failing one): the NaN
    request fails alone and the others get exactly their greedy tokens."""
    from server.engine.speculative import SpeculativeConfig

    engine = small_engine
    if "nan" not in engine.static_adapters:
        place_static(engine, nan_adapter(engine, adapter_dirs["r4-qv"], "nan"))
    repetitive = [(p + " " + p + " " + p, a) for p, a in GOOD_JOBS]
    alone = [greedy_outputs(engine, [job], 16)[0] for job in repetitive]
    engine.scheduler.speculator = spec = engine.make_speculator(SpeculativeConfig(num_speculative_tokens=3))
    try:
        seqs = run_together(engine, [("Hello hello hello", "nan"), *repetitive], 16)
    finally:
        engine.scheduler.speculator = None
    assert seqs[0].finish_reason == "error" and str(seqs[0].error) == NON_FINITE
    assert [s.output_token_ids for s in seqs[1:]] == alone
    assert spec.drafted > 0
