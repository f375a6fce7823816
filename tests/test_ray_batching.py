"""server.ray_serve.batching: how a replica merges a sequence's outputs into fewer messages (no Ray needed)."""
from __future__ import annotations

import asyncio

import pytest

from server.engine.async_engine import RequestOutput
from server.ray_serve.batching import in_batches, merge_outputs


async def _timed_source(delays: list[float], fail_after: int | None = None, closed: list | None = None):
    try:
        for i, d in enumerate(delays):
            await asyncio.sleep(d)
            if fail_after is not None and i == fail_after:
                raise ValueError("the sequence failed")
            yield i
    finally:
        if closed is not None:
            closed.append(True)


async def _collect(source, interval):
    return [batch async for batch in in_batches(source, interval)]


def test_the_first_item_goes_alone_and_later_ones_merge_within_the_interval():
    # items every 10 ms, merged over 45 ms: the first alone, then groups of several, nothing lost or reordered
    batches = asyncio.run(_collect(_timed_source([0.0] + [0.01] * 12), 0.045))
    assert batches[0] == [0]
    assert [x for b in batches for x in b] == list(range(13))
    assert len(batches) < 13 and max(len(b) for b in batches) >= 3


def test_interval_zero_sends_each_item_and_none_sends_the_rest_at_the_end():
    assert asyncio.run(_collect(_timed_source([0.0, 0.001, 0.001]), 0)) == [[0], [1], [2]]
    assert asyncio.run(_collect(_timed_source([0.0, 0.001, 0.001, 0.001]), None)) == [[0], [1, 2, 3]]
    assert asyncio.run(_collect(_timed_source([]), 0.05)) == []


def test_an_idle_source_is_not_waited_on_an_interval_after_a_quiet_spell():
    # a token that comes long after the previous list went out leaves at once, not an interval later
    async def run():
        loop = asyncio.get_running_loop()
        seen = []
        async for batch in in_batches(_timed_source([0.0, 0.2]), 0.05):
            seen.append((batch, loop.time()))
        return seen

    seen = asyncio.run(run())
    assert [b for b, _ in seen] == [[0], [1]]
    assert seen[1][1] - seen[0][1] < 0.2 + 0.04


@pytest.mark.parametrize("interval", [0.02, None])
def test_the_sources_failure_comes_after_the_items_before_it(interval):
    async def run():
        got = []
        with pytest.raises(ValueError, match="the sequence failed"):
            async for batch in in_batches(_timed_source([0.0, 0.001, 0.001, 0.001], fail_after=3), interval):
                got += batch
        return got

    assert asyncio.run(run()) == [0, 1, 2]


def test_leaving_early_closes_the_source():
    async def run():
        closed = []
        batches = in_batches(_timed_source([0.0] + [0.01] * 50, closed=closed), 0.02)
        async for batch in batches:
            if batch != [0]:
                break
        await batches.aclose()
        return closed

    assert asyncio.run(run()) == [True]


def test_merged_outputs_join_what_is_new_and_keep_the_last_state():
    outs = [RequestOutput("Hel", [1], False, None, 5, 1), RequestOutput("lo", [2, 3], False, None, 5, 3),
            RequestOutput("!", [4], True, "stop", 5, 4)]  # fmt: skip
    assert merge_outputs(outs) == RequestOutput("Hello!", [1, 2, 3, 4], True, "stop", 5, 4)
    assert merge_outputs(outs[:1]) is outs[0]
