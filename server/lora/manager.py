"""Device-resident adapters: where each one's units sit in the per-module pools, within a byte budget.

Adapters live in *pool spaces* (server.families.registry.SPACES): LoRA's unit is a rank-row
(`lora_a`/`lora_b` rows), S²FT's an entry (one selected row or column with its index). An adapter
owns the same unit range [start, start + units) in every pool of its space, zero where it does not
target a module, so one per-step plan (segments -> start, units) serves all modules of that space.

Residency is budgeted in bytes of pool memory (units x bytes per unit over all pools of the space).
When a new adapter does not fit, the least recently used adapter that no running sequence uses and
that is not pinned is evicted. Only the engine thread calls this class.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from server.errors import AdapterTooLarge
from server.families.base import AdapterWeights
from server.families.registry import FAMILIES, SPACES
from server.layers.linear import AdaptedLinear, AdapterSlot
from server.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ResidentAdapter:
    name: str
    family: str
    space: str  # the pool space its units are in
    row_start: int  # first unit in its space's pools
    rank: int  # units it owns (LoRA: max rank; S²FT: max entries per module)
    plan_units: int  # units the step plan drives from row_start (routed experts: the attention LoRA's)
    num_bytes: int  # of the adapter's own weights
    weights: AdapterWeights | None = None  # kept for families with a per-step hook (the routers of routed experts)
    targets: frozenset = frozenset()  # module names the step plan must visit for it
    active: int = 0  # sequences admitted with it
    pinned: bool = False


class RowAllocator:
    """First-fit allocation of unit ranges; adjacent free ranges merge on release."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.free: list[tuple[int, int]] = [(0, capacity)] if capacity else []  # (start, length), sorted

    def allocate(self, n: int) -> int | None:
        for i, (start, length) in enumerate(self.free):
            if length >= n:
                self.free[i : i + 1] = [(start + n, length - n)] if length > n else []
                return start
        return None

    def release(self, start: int, n: int) -> None:
        self.free.append((start, n))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for s, length in self.free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((s, length))
        self.free = merged

    def grow(self, new_capacity: int) -> None:
        self.release(self.capacity, new_capacity - self.capacity)
        self.capacity = new_capacity


class SpacePools:
    """One pool space's pools over every module, and the allocator of their unit ranges."""

    def __init__(self, space, dtype: torch.dtype, initial: int):
        self.space, self.name, self.dtype = space, space.name, dtype
        self.units = RowAllocator(initial)
        self.pooled: list[AdapterSlot] = []  # slots that have this family's pools
        self.unit_bytes = 0  # bytes one unit costs over every pool of the space (kept, not recomputed per step)
        self.resident_units = 0  # units owned by resident adapters (the manager keeps it)

    def ensure_pools(self, slot: AdapterSlot, owner: AdaptedLinear) -> None:
        if slot not in self.pooled:
            for name, (tail, dtype) in self.space.pools(slot.d_in, slot.d_out, self.dtype).items():
                slot.pools[name] = torch.zeros((self.units.capacity, *tail), dtype=dtype)
                self.unit_bytes += slot.pools[name][0].nbytes
            self.pooled.append(slot)
            owner.refresh_active()

    def clear(self, start: int, n: int) -> None:
        for slot in self.pooled:
            for name in self.space.pools(slot.d_in, slot.d_out, self.dtype):
                slot.pools[name][start : start + n] = 0

    def grow(self, capacity: int) -> None:
        log.info("growing %s adapter pools from %d to %d units", self.name, self.units.capacity, capacity)
        for slot in self.pooled:
            for name in self.space.pools(slot.d_in, slot.d_out, self.dtype):
                old = slot.pools[name]
                new = torch.zeros((capacity, *old.shape[1:]), dtype=old.dtype)
                new[: old.shape[0]] = old
                slot.pools[name] = new
        self.units.grow(capacity)


class AdapterManager:
    def __init__(self, model: LlamaForCausalLM, budget_bytes: int | None = None, initial_units: int = 256):
        self.model = model
        self.dtype = model.dtype
        self.budget_bytes = budget_bytes  # None: grow without limit
        self.resident: OrderedDict[str, ResidentAdapter] = OrderedDict()  # least recently used first
        self._targets = [layer.adapter_targets() for layer in model.layers]
        self.spaces = {name: SpacePools(space, self.dtype, initial_units) for name, space in SPACES.items()}
        self.evictions = self.hits = self.misses = 0

    # -- queries ---------------------------------------------------------------------------
    def get(self, name: str) -> ResidentAdapter | None:
        return self.resident.get(name)

    @property
    def row_bytes(self) -> int:
        """Bytes one LoRA rank-row costs over every LoRA pool that exists."""
        return self.spaces["lora"].unit_bytes

    @property
    def resident_bytes(self) -> int:
        return sum(space.resident_units * space.unit_bytes for space in self.spaces.values())

    @property
    def pool_bytes(self) -> int:
        return sum(space.units.capacity * space.unit_bytes for space in self.spaces.values())

    # -- residency -------------------------------------------------------------------------
    def ensure_resident(self, weights) -> ResidentAdapter | None:
        """Place the adapter in its family's pools if it is not there, evicting idle ones to fit;
        None if it cannot fit now. `weights`: what a family parses (server.families.base.AdapterWeights)."""
        entry = self.resident.get(weights.name)
        if entry is not None:
            self.touch(weights.name)
            return entry
        space = self.spaces[weights.space]
        for layer, module in weights.modules:  # new pools first: they change what a unit costs
            lin = self._targets[layer][module]
            space.ensure_pools(lin.slots[module], lin)
        cost = weights.units * space.unit_bytes
        if self.budget_bytes is not None:
            if cost > self.budget_bytes:
                raise AdapterTooLarge(f"adapter {weights.name!r} needs {cost} bytes, more than the whole adapter budget {self.budget_bytes}", self.budget_bytes)
            while self.resident_bytes + cost > self.budget_bytes:
                if not self._evict_one():
                    return None
        start = self._allocate(space, weights.units)
        if start is None:
            return None
        space.clear(start, weights.units)
        try:
            for (layer, module) in weights.modules:
                weights.write_into(self._targets[layer][module].slots[module].pools, layer, module, start, self.dtype)
        except Exception:  # the adapter's weights do not fit its own description: give its units back
            space.clear(start, weights.units)
            space.units.release(start, weights.units)
            raise
        hooked = FAMILIES[weights.family].step_hooks is not None  # its hook consults the weights every step
        entry = ResidentAdapter(weights.name, weights.family, weights.space, start, weights.units, weights.plan_units, weights.num_bytes,
                                weights if hooked else None, weights.targets)  # fmt: skip
        self.resident[weights.name] = entry
        space.resident_units += weights.units
        self.misses += 1
        return entry

    def add(self, weights, pinned: bool = False) -> ResidentAdapter:
        if weights.name in self.resident:
            raise ValueError(f"adapter {weights.name!r} is already resident")
        entry = self.ensure_resident(weights)
        if entry is None:
            raise ValueError(f"adapter {weights.name!r} does not fit in the adapter budget next to the pinned/active ones")
        entry.pinned = pinned
        return entry

    def touch(self, name: str) -> None:
        """A request uses a resident adapter: a hit, and the most recently used now."""
        self.resident.move_to_end(name)
        self.hits += 1

    def acquire(self, name: str) -> None:
        self.resident[name].active += 1

    def release(self, name: str) -> None:
        entry = self.resident.get(name)
        if entry is not None:
            entry.active -= 1

    def set_pinned(self, name: str, pinned: bool) -> None:
        entry = self.resident.get(name)
        if entry is not None:
            entry.pinned = pinned

    def remove(self, name: str) -> bool:
        """Drop an adapter unless a running sequence still uses it; True if it is gone."""
        entry = self.resident.get(name)
        if entry is None:
            return True
        if entry.active:
            return False
        del self.resident[name]
        space = self.spaces[entry.space]
        space.units.release(entry.row_start, entry.rank)
        space.resident_units -= entry.rank
        return True

    # -- internals -------------------------------------------------------------------------
    def _evict_one(self) -> bool:
        for name, entry in self.resident.items():  # least recently used first
            if not entry.active and not entry.pinned:
                log.debug("evicting adapter %s from the device pools", name)
                self.remove(name)
                self.evictions += 1
                return True
        return False

    def _allocate(self, space: SpacePools, units: int) -> int | None:
        alloc = space.units
        while (start := alloc.allocate(units)) is None:
            limit = None if self.budget_bytes is None else self.budget_bytes // max(1, space.unit_bytes)
            if limit is None or alloc.capacity < limit:
                target = max(alloc.capacity * 2, alloc.capacity + units)
                space.grow(target if limit is None else min(target, max(limit, alloc.capacity + units)))
            elif not self._evict_one():  # fragmented: free more units
                return None
        return start
