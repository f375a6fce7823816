"""Requests for different adapters share one batch and return exactly what each returns alone."""
from __future__ import annotations

import asyncio

import openai

from server.engine.sequence import SamplingParams, Sequence

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "def add(a, b):",
    "List three fruits:",
    "Once upon a time",
    "The quick brown fox",
    "In 1492, Columbus",
    "Translate to French: good morning",
]
# 8 requests: 7 adapters of ranks 2..32 with different target modules, and the base model
MODELS = ["r4-qv", "r8-all", "r16-attn", "r2-mlp", "r32-q", "r8-rslora", "r12-ko", None]


def _generate(engine, jobs, max_tokens=24):
    seqs = [Sequence(engine.tokenizer(p)["input_ids"], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), m) for p, m in jobs]
    for s in seqs:
        engine.add(s)
    adapters_per_step = []
    while engine.has_work():
        engine.step()
        adapters_per_step.append(engine.last_step.num_adapters)
    return [s.output_token_ids for s in seqs], adapters_per_step


def test_mixed_adapter_batch_equals_each_request_alone(engine):
    jobs = list(zip(PROMPTS, MODELS))
    together, adapters_per_step = _generate(engine, jobs)
    assert max(adapters_per_step) == 7  # really one batch holding all seven adapters
    for job, got in zip(jobs, together):
        alone, _ = _generate(engine, [job])
        assert got == alone[0], f"{job[1] or 'base'}: batched output differs from alone"


def test_same_prompt_on_different_adapters_gives_different_outputs(engine):
    outs, _ = _generate(engine, [("The capital of France is", m) for m in MODELS])
    assert len({tuple(o) for o in outs}) == len(MODELS)


def test_concurrent_http_requests_on_eight_adapters_match_sequential(live_server):
    client = openai.AsyncOpenAI(base_url=live_server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)

    async def one(prompt, model):
        r = await client.completions.create(model=model or "smollm2", prompt=prompt, max_tokens=16, temperature=0)
        return r.choices[0].text

    async def run():
        together = await asyncio.gather(*(one(p, m) for p, m in zip(PROMPTS, MODELS)))
        alone = [await one(p, m) for p, m in zip(PROMPTS, MODELS)]
        return together, alone

    together, alone = asyncio.run(run())
    assert together == alone
