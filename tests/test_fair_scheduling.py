"""Fair scheduling across tenants (server.engine.fairness: Virtual Token Counter) against first come first served.

The scheduler is pure bookkeeping, so most of this drives it with a stand-in for the model (each step
"samples" one token per sequence) and checks the admission order and the service each tenant gets;
the last test runs the real engine.
"""
from __future__ import annotations

import pytest

from server.engine.block_manager import BlockManager
from server.engine.fairness import OUTPUT_TOKEN_COST, PROMPT_TOKEN_COST, FairQueue, waiting_queue
from server.engine.scheduler import Scheduler
from server.engine.sequence import SamplingParams, Sequence

PROMPT, MAX_TOKENS = 12, 8
REQUEST_COST = PROMPT_TOKEN_COST * PROMPT + OUTPUT_TOKEN_COST * MAX_TOKENS


def request(tenant: str, weight: float = 1.0, prompt: int = PROMPT, max_tokens: int = MAX_TOKENS) -> Sequence:
    return Sequence([7] * prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), tenant=tenant, tenant_weight=weight)


def simulate(policy: str, arrivals: dict[int, list[Sequence]], steps: int, max_num_seqs: int = 4, num_blocks: int = 256, watch=None):
    """Run `steps` steps; arrivals[i] join before step i. Returns the sequences in the order they were admitted."""
    sched = Scheduler(BlockManager(num_blocks, 4, enable_prefix_caching=False), max_num_seqs, 64, waiting=waiting_queue(policy))
    admitted: list[Sequence] = []
    for step in range(steps):
        for seq in arrivals.get(step, []):
            sched.add(seq)
        before = set(map(id, sched.running))
        scheduled = sched.schedule()
        admitted += [s for s in sched.running if id(s) not in before]
        sched.postprocess(scheduled, [[1] if item.samples else [] for item in scheduled], frozenset())
        sched.release_finished()
        if watch is not None:
            watch(sched)
    return admitted


def test_fcfs_serves_a_flood_before_the_light_tenant_and_fair_does_not():
    def arrivals():
        return {0: [request("heavy") for _ in range(40)] + [request("light") for _ in range(4)]}

    def light_positions(order):
        return [i for i, s in enumerate(order) if s.tenant == "light"]

    assert light_positions(simulate("fcfs", arrivals(), 200)) == [40, 41, 42, 43]
    # fair: the light tenant's requests go in as soon as its counter is the smaller one
    assert max(light_positions(simulate("fair", arrivals(), 200))) <= 10


def test_a_tenant_arriving_later_is_admitted_ahead_of_the_backlog():
    order = simulate("fair", {0: [request("heavy") for _ in range(40)], 20: [request("light") for _ in range(3)]}, 300)
    heavy_before_light = [s for s in order[: order.index(next(s for s in order if s.tenant == "light"))] if s.tenant == "heavy"]
    assert len(heavy_before_light) < 20  # far from the 40 a queue would put first
    light = [i for i, s in enumerate(order) if s.tenant == "light"]
    assert light[-1] - light[0] <= 4  # and then they are not starved between heavy requests


def test_backlogged_tenants_never_drift_apart_by_more_than_twice_a_request():
    gaps = []

    def watch(sched):
        q = sched.waiting
        waiting = {s.tenant for s in q}
        if waiting == {"a", "b"}:
            gaps.append(abs(q.counters["a"] - q.counters["b"]))

    # b floods with long requests, a sends short ones: both stay backlogged
    arrivals = {0: [request("b", prompt=24, max_tokens=16) for _ in range(30)] + [request("a") for _ in range(60)]}
    simulate("fair", arrivals, 150, watch=watch)
    largest = PROMPT_TOKEN_COST * 24 + OUTPUT_TOKEN_COST * 16
    assert len(gaps) > 50 and max(gaps) <= 2 * largest


def test_weights_share_the_service_in_proportion():
    served: dict[str, float] = {"one": 0.0, "two": 0.0}

    def watch(sched):
        if {s.tenant for s in sched.waiting} == {"one", "two"}:
            for s in sched.running:
                served[s.tenant] += 1  # one token each step

    arrivals = {0: [request("one", 1.0) for _ in range(60)] + [request("two", 2.0) for _ in range(60)]}
    simulate("fair", arrivals, 120, watch=watch)
    assert served["two"] / served["one"] == pytest.approx(2.0, rel=0.25)


def test_preemption_takes_from_the_tenant_furthest_ahead():
    q = FairQueue()
    ahead, behind = request("ahead"), request("behind")
    for s in (ahead, behind):
        q.append(s)
        q.pop()
    q.charge(ahead, 100, 0)
    assert q.preemption_victim([ahead, behind]) is ahead
    assert waiting_queue("fcfs").preemption_victim([ahead, behind]) is behind  # the newest


def test_an_idle_tenant_banks_no_credit():
    q = FairQueue()
    busy = request("busy")
    q.append(busy)
    q.pop()
    q.charge(busy, 0, 1000)
    q.append(request("busy"))
    q.append(request("back-from-idle"))
    assert q.counters["back-from-idle"] == q.counters["busy"] == 2000


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="fair, fcfs"):
        waiting_queue("lottery")


def test_the_engine_admits_the_light_tenant_first_under_fair_scheduling(engine):
    """The real engine, two sequences at a time: a flood of one tenant, then one request of another."""
    old_max, old_queue = engine.scheduler.max_num_seqs, engine.scheduler.waiting
    engine.scheduler.max_num_seqs, engine.scheduler.waiting = 2, waiting_queue("fair")
    try:
        ids = engine.tokenizer("Tell me a story about a fox")["input_ids"]
        seqs = [Sequence(ids, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), tenant="heavy") for _ in range(8)]
        seqs.append(Sequence(ids, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), tenant="light"))
        for s in seqs:
            engine.add(s)
        while engine.has_work():
            engine.step()
    finally:
        engine.scheduler.max_num_seqs, engine.scheduler.waiting = old_max, old_queue
    order = sorted(seqs, key=lambda s: s.first_scheduled_time)
    assert [s.tenant for s in order].index("light") <= 2
    assert all(s.output_token_ids == seqs[0].output_token_ids for s in seqs)  # same prompt, same tokens


# -- through the real HTTP server, tenants calling with their own keys ---------------------------
def test_over_http_a_flooding_tenant_delays_itself_under_fair_and_everyone_under_fcfs(model_dir, tmp_path):
    import asyncio

    import httpx

    from server.adapters.service import build_adapter_service
    from server.api.app import build_app
    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from tests.conftest import LiveServer

    engine = LLMEngine(EngineConfig(quantization="none", model=model_dir, kv_cache_tokens=4096, max_num_seqs=2, enforce_eager=True))
    service = build_adapter_service(engine, str(tmp_path / "store"), None, tmp_path / "cache", 1 << 30, 1 << 30)

    async def keys():
        for t in ("heavy", "light"):
            await service.registry.create_tenant(t)
        return {t: (await service.registry.create_key(t))[1] for t in ("heavy", "light")}

    key = asyncio.run(keys())
    with LiveServer(build_app(engine, api_key="admin-key", adapter_service=service)) as srv:

        async def finish_order() -> list[str]:
            order: list[str] = []
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as client:
                async def one(tenant: str, i: int) -> None:
                    body = {"model": engine.model_name, "prompt": f"Count to {i}:", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
                    r = await client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key[tenant]}"})
                    assert r.status_code == 200, r.text
                    order.append(tenant)

                flood = [asyncio.ensure_future(one("heavy", i)) for i in range(20)]  # 10x the light tenant's load
                while len(engine.scheduler.waiting) < 12:  # the flood is queued first
                    await asyncio.sleep(0.01)
                await asyncio.gather(*(one("light", i) for i in range(2)), *flood)
            return order

        positions = {}
        for policy in ("fcfs", "fair"):
            engine.scheduler.waiting = waiting_queue(policy)  # the server is idle between the two runs
            order = asyncio.run(finish_order())
            positions[policy] = [i for i, t in enumerate(order) if t == "light"]
    assert min(positions["fcfs"]) >= 12  # behind the queued flood
    assert max(positions["fair"]) <= 6  # ahead of it: admitted as soon as a slot frees
