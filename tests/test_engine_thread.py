"""The server's engine is built on its own thread and its loop runs there (server.engine.engine_thread
says why: ~12 % of single-stream decode speed on the CPU)."""
from __future__ import annotations

import asyncio
import threading

import pytest

from server.config import EngineConfig
from server.engine.async_engine import AsyncEngine
from server.engine.engine_thread import EngineThread
from server.engine.llm_engine import LLMEngine
from server.engine.sequence import SamplingParams, Sequence


def test_engine_thread_runs_calls_in_order_on_one_thread():
    worker = EngineThread(name="test-worker")
    seen = []
    futures = [worker.submit(lambda i=i: seen.append((i, threading.current_thread().name))) for i in range(5)]
    assert worker.call(lambda: threading.current_thread().name) == "test-worker"
    assert all(f.done() for f in futures)
    assert seen == [(i, "test-worker") for i in range(5)]
    with pytest.raises(ZeroDivisionError):  # the caller gets the exception; the thread goes on
        worker.call(lambda: 1 / 0)
    assert worker.call(lambda: 7) == 7 and worker.is_alive()


def test_the_loop_runs_where_the_engine_was_built(model_dir):
    engine = LLMEngine.on_own_thread(EngineConfig(model=model_dir, kv_cache_tokens=1024, quantization="none"))
    built_on = engine.thread.call(threading.get_ident)
    assert built_on != threading.get_ident()
    runner = AsyncEngine(engine)
    runner.start()

    async def scenario():
        assert await runner.call(lambda e: threading.get_ident()) == built_on
        seq = Sequence(engine.tokenizer("Hello")["input_ids"], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
        return [out async for out in runner.generate(seq)]

    try:
        outputs = asyncio.run(scenario())
        assert outputs[-1].finished and outputs[-1].num_output_tokens == 5
        assert runner.healthy
    finally:
        runner.stop()
    assert not runner.healthy  # the loop has returned; the thread is free for other calls
    assert engine.thread.call(lambda: 3) == 3
