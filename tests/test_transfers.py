"""The adapter-load protocol (server.engine.transfer): loads never stall the other tenants' steps.

`HeldTransfers` is the CPU's synchronous transfers (the copies land at once, so every number is
right) whose tickets complete only when the test releases them, and which records the order of the
calls: what a CUDA side stream does, observable on a machine without one. (A stand-in for CUDA
streams and events, which cannot run here.)
"""
from __future__ import annotations

from contextlib import contextmanager

import pytest

from server.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sequence import SamplingParams, Sequence
from server.engine.transfer import SyncTransfers
from server.lora.peft import read_adapter_files
from tests.conftest import greedy_outputs


class HeldTransfers(SyncTransfers):
    def __init__(self):
        self.log: list[str] = []
        self.released: set[int] = set()
        self.tickets = 0
        self.hold = True

    @contextmanager
    def side(self):
        self.log.append("side")
        yield
        self.log.append("side-end")

    def after_compute(self) -> None:
        self.log.append("after_compute")

    def record(self) -> int:
        self.tickets += 1
        self.log.append(f"record {self.tickets}")
        if not self.hold:
            self.released.add(self.tickets)
        return self.tickets

    def done(self, ticket: int) -> bool:
        return ticket in self.released

    def wait(self, ticket: int) -> None:
        self.log.append(f"wait {ticket}")
        self.released.add(ticket)


@pytest.fixture
def held(model_dir, adapter_dirs):
    engine = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, kv_cache_tokens=2048))
    transfers = engine.adapters.transfers = HeldTransfers()
    weights = {name: engine.parse_adapter(read_adapter_files(adapter_dirs[name], name), name) for name in ("r8-all", "r16-attn")}
    return engine, transfers, weights


def _request(engine, prompt: str, adapter=None, weights=None, max_tokens: int = 6) -> Sequence:
    seq = Sequence(engine.tokenizer(prompt)["input_ids"], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                   adapter, weights)
    engine.add(seq)
    return seq


def test_a_loading_adapter_waits_while_other_requests_decode(held, model_dir, adapter_dirs):
    engine, transfers, weights = held
    base = _request(engine, "The capital of France is")
    tuned = _request(engine, "The capital of France is", "r8-all", weights["r8-all"])
    for _ in range(4):
        engine.step()
    assert len(base.output_token_ids) == 4  # the base request decoded every step ...
    assert tuned.output_token_ids == [] and tuned in engine.scheduler.waiting  # ... while the adapter's copy was in flight
    entry = engine.adapters.get("r8-all")
    assert entry is not None and entry.loading is not None and entry.active == 0
    # copies run on the side stream, after the compute issued before them (rule 1)
    assert transfers.log[:3] == ["after_compute", "side", "side-end"] and transfers.log[3] == "record 1"

    transfers.released.add(1)  # the copy completes: the next step admits the request
    while engine.has_work():
        engine.step()
    assert engine.adapters.get("r8-all").loading is None
    reference = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, adapters={"r8-all": adapter_dirs["r8-all"]}, kv_cache_tokens=2048))
    assert tuned.output_token_ids == greedy_outputs(reference, [("The capital of France is", "r8-all")], 6)[0]
    assert base.output_token_ids == greedy_outputs(reference, [("The capital of France is", None)], 6)[0]


def test_a_loading_adapter_is_never_evicted_and_removal_waits_for_its_copy(held):
    engine, transfers, weights = held
    manager = engine.adapters
    assert manager.ensure_resident(weights["r8-all"]) is None  # placed, copy in flight
    manager.budget_bytes = manager.resident_bytes + weights["r16-attn"].units * manager.spaces["lora"].unit_bytes - 1  # no room for both ...
    assert manager.ensure_resident(weights["r16-attn"]) is None  # ... and the loading one is not evicted for it
    assert manager.get("r8-all") is not None and manager.get("r16-attn") is None
    assert manager.remove("r8-all")  # dropping it waits for its copy first (rule 3)
    assert "wait 1" in transfers.log and manager.get("r8-all") is None


def test_growing_the_pools_waits_for_copies_in_flight(held):
    engine, transfers, weights = held
    manager = engine.adapters
    space = manager.spaces["lora"]
    assert manager.ensure_resident(weights["r8-all"]) is None
    capacity = space.units.capacity
    space.units.allocate(space.units.free[0][1])  # the rest of the pools is taken: the next load must grow them
    assert manager.ensure_resident(weights["r16-attn"]) is None
    assert space.units.capacity > capacity
    assert transfers.log.index("wait 1") < transfers.log.index("record 2")  # the first copy landed before the pools were replaced


def test_a_load_that_landed_after_its_requests_left_can_be_evicted(held):
    """Its requests were aborted while the copy was in flight: nobody asks for it again, yet its rows
    must go back to the pool (else it holds the budget for good)."""
    engine, transfers, weights = held
    manager = engine.adapters
    assert manager.ensure_resident(weights["r8-all"]) is None
    transfers.released.add(1)  # the copy lands; no request is left to notice
    manager.budget_bytes = manager.resident_bytes + weights["r16-attn"].units * manager.spaces["lora"].unit_bytes - 1
    assert manager.ensure_resident(weights["r16-attn"]) is None  # placed (its own copy now in flight) ...
    assert manager.get("r8-all") is None and manager.get("r16-attn") is not None  # ... by evicting the idle one
