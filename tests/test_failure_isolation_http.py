"""Through the real HTTP server: requests whose adapter is corrupt in the store, or too large for the
whole device budget, fail alone (503 / 400) while the requests sent with them complete with the
tokens they get alone. (The engine-level cases — non-finite numbers, an exception in one family's
kernel path, speculative decoding — are in tests/test_engine_isolation.py.)"""
from __future__ import annotations

import asyncio

import openai

from tests.test_all_families import _upload
from tests.test_prefix_cache_http import _lora_files, server  # noqa: F401  (the module's server)

GOOD = [("base", "The capital of France is"), ("t/lora", "def add(a, b):"), ("base", "1, 2, 3,"), ("t/lora", "Dear customer,")]


def test_a_corrupt_and_a_too_large_adapter_fail_alone_beside_good_requests(server, adapter_dirs):  # noqa: F811
    r = _upload(server.http, "corrupt", _lora_files(adapter_dirs, "r4-qv"))
    blob = next(server.store_root.rglob(r["files"]["adapter_model.safetensors"]["sha256"]))
    blob.write_bytes(b"garbage" + blob.read_bytes()[7:])
    client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)

    async def one(model, prompt):
        try:
            out = await client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        except openai.APIStatusError as e:
            return e.status_code, e.body["code"]
        return out.choices[0].text

    adapters = server.engine.adapters
    budget = adapters.budget_bytes

    async def run():
        alone = [await one(m, p) for m, p in GOOD]  # t/lora is placed: its pools exist, so a row has a price
        adapters.budget_bytes = 12 * adapters.row_bytes  # room for t/lora's 8 rank-rows, never for t/lora2's 16
        together = await asyncio.gather(*(one(m, p) for m, p in GOOD), one("t/lora2", "Hello"), one("t/corrupt", "Hello"))
        adapters.budget_bytes = budget
        return alone, together, await one("base", GOOD[0][1])

    try:
        alone, together, after = asyncio.run(run())
    finally:
        adapters.budget_bytes = budget
    assert together[: len(GOOD)] == alone
    assert together[len(GOOD)] == (400, "adapter_too_large")
    assert together[len(GOOD) + 1] == (503, "adapter_corrupt")
    assert after == alone[0]  # and the server goes on
