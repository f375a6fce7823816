"""Device residency under a byte budget: adapters come and go between steps, never from under a running request."""
from __future__ import annotations

import pytest
import torch

from server.config import EngineConfig
from server.engine.sequence import SamplingParams, Sequence
from server.lora.manager import AdapterManager
from server.lora.peft import load_peft_lora

NAMES = ["r4-qv", "r8-all", "r16-attn", "r2-mlp", "r32-q", "r12-ko"]


@pytest.fixture(scope="module")
def host_weights(engine, adapter_dirs):
    cfg = engine.model.config
    return {n: load_peft_lora(adapter_dirs[n], n, cfg, torch.float32, 64) for n in NAMES}


def _run(eng, jobs):
    seqs = [Sequence(eng.tokenizer(p)["input_ids"], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), w.name if w else None, adapter_weights=w) for p, w in jobs]
    for s in seqs:
        eng.add(s)
    while eng.has_work():
        eng.step()
        mgr = eng.adapters
        assert mgr.budget_bytes is None or mgr.resident_bytes <= mgr.budget_bytes
        for s in eng.scheduler.running:  # everything a running sequence needs is resident
            assert s.adapter is None or mgr.get(s.adapter) is not None
    return [s.output_token_ids for s in seqs]


def test_budget_smaller_than_the_working_set_evicts_and_every_request_is_correct(model_dir, engine, host_weights):
    from server.engine.llm_engine import LLMEngine

    # room for about two of the six adapters at a time (r8-all sizes the pools: all seven modules)
    small = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, kv_cache_tokens=4096, max_num_seqs=4))
    row_bytes_all = sum(d_in + d_out for d_in, d_out in [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]) * small.adapters.spaces["lora"].dtype.itemsize * 30
    small.adapters.budget_bytes = 40 * row_bytes_all
    jobs = [(f"Request {i}: tell me something", host_weights[NAMES[i % len(NAMES)]]) for i in range(8)]
    got = _run(small, jobs)
    assert small.adapters.evictions > 0
    # the reference: the session engine, where all these adapters are resident (pinned) for good
    reference = _run(engine, [(p, w) for p, w in jobs])
    assert got == reference


def test_an_adapter_in_use_is_never_evicted(engine, host_weights):
    import copy

    # a second manager on the engine's model would fight its pools: use a private copy without adapters

    model = copy.deepcopy(engine.model)
    for layer in model.layers:
        for lin in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
            for slot in lin.slots.values():
                slot.pools.clear()
            lin.refresh_active()
    first = host_weights["r16-attn"]
    mgr = AdapterManager(model, budget_bytes=None)
    mgr.ensure_resident(first)
    mgr.budget_bytes = mgr.resident_bytes  # exactly one rank-16 adapter fits
    mgr.acquire(first.name)
    assert mgr.ensure_resident(host_weights["r4-qv"]) is None  # would need to evict the busy one
    assert mgr.get(first.name) is not None
    mgr.release(first.name)
    assert mgr.ensure_resident(host_weights["r4-qv"]) is not None
    assert mgr.get(first.name) is None and mgr.evictions == 1
    mgr.set_pinned("r4-qv", True)
    assert mgr.ensure_resident(first) is None  # pinned adapters stay
    assert mgr.get("r4-qv") is not None
