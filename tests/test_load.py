"""More work than the KV cache holds is queued and completes; an aborted stream frees its blocks at once."""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from server.config import EngineConfig
from server.engine.sequence import SamplingParams, Sequence
from tests.conftest import LiveServer


@pytest.fixture(scope="module")
def small_engine(model_dir, adapter_dirs):
    from server.engine.llm_engine import LLMEngine

    # 12 blocks of 16 tokens: room for about three of the requests below at a time
    return LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, adapters={k: adapter_dirs[k] for k in ("r4-qv", "r8-all")}, kv_cache_tokens=192, max_num_batched_tokens=64))


def test_requests_beyond_the_kv_budget_queue_and_all_complete(small_engine):
    eng = small_engine
    seqs = [
        Sequence(eng.tokenizer(f"Story number {i}: once upon a time")["input_ids"], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True), [None, "r4-qv", "r8-all"][i % 3])
        for i in range(8)
    ]
    for s in seqs:
        eng.add(s)
    peak_running = 0
    while eng.has_work():
        eng.step()
        peak_running = max(peak_running, len(eng.scheduler.running))
        assert eng.block_manager.num_used <= eng.block_manager.num_blocks
    # the budget really constrained the batch: not every sequence could hold its blocks at once
    assert sum(s.num_preemptions for s in seqs) > 0 or peak_running < len(seqs)
    assert all(s.finish_reason == "length" and len(s.output_token_ids) == 32 for s in seqs)
    assert eng.block_manager.num_used == 0
    # preempted or not, each output equals the same request served alone
    for s in seqs[:3]:
        alone = Sequence(list(s.prompt_token_ids), s.params, s.adapter)
        eng.add(alone)
        while eng.has_work():
            eng.step()
        assert alone.output_token_ids == s.output_token_ids


def test_long_prompt_is_prefilled_in_chunks_with_the_same_result(small_engine, engine):
    prompt = engine.tokenizer(" ".join(["word"] * 100) + " The end.")["input_ids"]
    assert len(prompt) > small_engine.config.max_num_batched_tokens
    outs = []
    for eng in (small_engine, engine):  # chunks of 64 tokens vs the whole prompt in one step
        seq = Sequence(list(prompt), SamplingParams(max_tokens=8, temperature=0.0), "r8-all")
        eng.add(seq)
        while eng.has_work():
            eng.step()
        outs.append(seq.output_token_ids)
    assert outs[0] == outs[1]


def test_http_overload_queues_every_request(small_engine):
    from server.api.app import build_app

    with LiveServer(build_app(small_engine)) as srv:
        client = openai.AsyncOpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=300)

        async def run():
            return await asyncio.gather(*(
                client.completions.create(model=["r4-qv", "r8-all", small_engine.model_name][i % 3], prompt=f"Tell me about {i}", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
                for i in range(10)
            ))

        results = asyncio.run(run())
        assert all(r.usage.completion_tokens == 30 for r in results)
        metrics = httpx.get(srv.base_url + "/metrics").text
        assert "hotswap_kv_cache_blocks_used 0.0" in metrics


def test_aborted_stream_frees_its_blocks(small_engine):
    from server.api.app import build_app

    eng = small_engine
    with LiveServer(build_app(eng)) as srv:
        body = {"model": "r8-all", "prompt": "Count slowly:", "max_tokens": 150, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=60) as r:
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got += 1
                if got >= 3:
                    break
            assert eng.block_manager.num_used > 0
        # the client hung up mid-stream: the sequence is aborted and its blocks are back within a step or two
        deadline = time.time() + 10
        while time.time() < deadline and (eng.block_manager.num_used or eng.scheduler.has_work()):
            time.sleep(0.05)
        assert eng.block_manager.num_used == 0
        assert not eng.scheduler.running
