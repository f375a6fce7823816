"""Fewer, larger messages from an engine replica to the ingress.

Every message a replica streams costs a Ray object, a hop and work in the ingress's event loop; on a
small machine that work competes with the engines for the CPU, so one message per token makes the
tokens themselves slower (docs/scale-out.md, "The latency Ray adds"). As Ray Serve LLM does
(`stream_batching_interval_ms`, 50 ms), a replica merges the outputs of one sequence that arrive
within an interval into one — but sends the first at once (time to first token is not delayed), and a
request whose client reads only the whole result (not streamed) gets everything after the first in one
message at the end.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import TypeVar

from server.engine.async_engine import RequestOutput

T = TypeVar("T")

DEFAULT_INTERVAL_S = 0.05  # Ray Serve LLM's default stream batching interval


async def in_batches(source: AsyncIterator[T], interval_s: float | None) -> AsyncIterator[list[T]]:
    """The source's items as lists: the first alone, as soon as it comes; after that, a list goes out
    once at least one item is waiting and `interval_s` has passed since the previous list (0: each item
    as it comes; None: all the rest in one list when the source ends). The source's exception is raised
    after the items that came before it. Leaving early closes the source (an engine stream then aborts
    its sequence)."""
    it = aiter(source)
    try:
        first = await anext(it)
    except StopAsyncIteration:
        return
    yield [first]
    if interval_s == 0:
        async for item in it:
            yield [item]
        return

    pending: list[T] = []
    arrived, done = asyncio.Event(), asyncio.Event()

    async def read() -> None:
        try:
            async for item in it:
                pending.append(item)
                arrived.set()
        finally:
            done.set()
            arrived.set()

    reader = asyncio.ensure_future(read())
    sent_at = time.monotonic()
    try:
        while True:
            if interval_s is None:
                await done.wait()
            else:
                wait = sent_at + interval_s - time.monotonic()
                if wait > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(done.wait(), wait)  # the end needs no waiting
                await arrived.wait()
            arrived.clear()
            if pending:
                batch = pending[:]
                pending.clear()
                sent_at = time.monotonic()
                yield batch
            if done.is_set() and not pending:
                reader.result()  # the source's exception, if it failed
                return
    finally:
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader  # the source closes (its sequence aborts) before we return


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one sequence as one: what is new since the previous output (text, token
    ids, and any other list a field holds, per token) is joined; the rest (finished, counts) is the
    last output's."""
    if len(outputs) == 1:
        return outputs[0]
    merged = {}
    for f in dataclasses.fields(RequestOutput):
        values = [getattr(o, f.name) for o in outputs]
        if all(isinstance(v, str) for v in values):
            merged[f.name] = "".join(values)
        elif any(isinstance(v, list) for v in values):
            lists = [v for v in values if v is not None]
            merged[f.name] = [x for v in lists for x in v]
        else:
            merged[f.name] = values[-1]
    return RequestOutput(**merged)
