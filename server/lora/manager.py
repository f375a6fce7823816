"""Device-resident adapters: where each one's units sit in the per-module pools, within a byte budget.

Adapters live in *pool spaces* (server.families.registry.SPACES): LoRA's unit is a rank-row
(`lora_a`/`lora_b` rows), S²FT's an entry (one selected row or column with its index). An adapter
owns the same unit range [start, start + units) in every pool of its space, zero where it does not
target a module, so one per-step plan (segments -> start, units) serves all modules of that space.

Residency is budgeted in bytes of pool memory (units x bytes per unit over all pools of the space).
When a new adapter does not fit, the least recently used adapter that no running sequence uses and
that is not pinned is evicted. Only the engine thread calls this class.

Pools live on the engine's device. A load lays the adapter's rows out in host memory first (its
family's `write_into` on host buffers of its unit range: scales folded in, pinned on CUDA, kept with
the weights there), then copies them on the transfer stream (server.engine.transfer): the adapter is
resident but *loading* until that copy completes, and its requests wait for it while every other
tenant's steps go on. On the CPU the copy is done at once. On CUDA the pools of the LoRA space are
allocated at start-up for every module, as many units as the adapter budget buys, so they are never
reallocated while serving.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from server.errors import AdapterTooLarge, InvalidAdapter
from server.families.base import AdapterWeights
from server.families.registry import FAMILIES, SPACES
from server.layers.linear import AdaptedLinear, AdapterSlot
from server.engine.transfer import SyncTransfers, Transfers
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
    loading: Any = None  # (transfer ticket, host rows it copies from) until its copy has completed


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

    def __init__(self, space, dtype: torch.dtype, initial: int, device: torch.device):
        self.space, self.name, self.dtype, self.device = space, space.name, dtype, device
        self.units = RowAllocator(initial)
        self.pooled: list[AdapterSlot] = []  # slots that have this family's pools
        self.unit_bytes = 0  # bytes one unit costs over every pool of the space (kept, not recomputed per step)
        self.resident_units = 0  # units owned by resident adapters (the manager keeps it)
        self.generation = 0  # bumped whenever a pool is added or replaced (CUDA graphs hold their addresses)

    def ensure_pools(self, slot: AdapterSlot, owner: AdaptedLinear) -> None:
        if slot not in self.pooled:
            for name, (tail, dtype) in self.space.pools(slot.d_in, slot.d_out, self.dtype).items():
                slot.pools[name] = torch.zeros((self.units.capacity, *tail), dtype=dtype, device=self.device)
                self.unit_bytes += slot.pools[name][0].nbytes
            self.pooled.append(slot)
            self.generation += 1
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
                new = torch.zeros((capacity, *old.shape[1:]), dtype=old.dtype, device=self.device)
                new[: old.shape[0]] = old
                slot.pools[name] = new
        self.units.grow(capacity)
        self.generation += 1


class AdapterManager:
    def __init__(self, model: LlamaForCausalLM, budget_bytes: int | None = None, initial_units: int = 256,
                 device: torch.device | str = "cpu", transfers: Transfers | None = None, preallocate: bool = False,
                 lora_dtype: torch.dtype | None = None):
        self.model = model
        self.dtype = model.dtype
        self.device = torch.device(device)
        self.transfers = transfers or SyncTransfers()
        self.budget_bytes = budget_bytes  # None: grow without limit
        self.resident: OrderedDict[str, ResidentAdapter] = OrderedDict()  # least recently used first
        self._targets = [layer.adapter_targets() for layer in model.layers]
        # The LoRA space's pools may be stored narrower than the model (--lora-dtype); the kernels compute in
        # the model's dtype. The other spaces' pools are in the model's dtype.
        pool_dtypes = {"lora": lora_dtype or self.dtype}
        self.spaces = {name: SpacePools(space, pool_dtypes.get(name, self.dtype), initial_units, self.device)
                       for name, space in SPACES.items()}
        self.evictions = self.hits = self.misses = 0
        self.keep_host_rows = self.device.type == "cuda"  # pinned rows stay with the weights for the next load
        if preallocate and budget_bytes is not None:
            self._preallocate("lora", budget_bytes)

    def pools_everywhere(self, space_name: str) -> None:
        """Give every module the pools of a space now, rather than when a first adapter targets it: a
        compiled step's code then never changes as adapters come (server.engine.compiled_decode)."""
        space = self.spaces[space_name]
        for targets in self._targets:
            for module, lin in targets.items():
                space.ensure_pools(lin.slots[module], lin)

    def _preallocate(self, space_name: str, budget_bytes: int) -> None:
        """Every module's pools of a space, as many units as the budget buys over all of them."""
        space = self.spaces[space_name]
        self.pools_everywhere(space_name)
        units = budget_bytes // max(1, space.unit_bytes)
        if units > space.units.capacity:
            space.grow(units)
        log.info("%s adapter pools: %d units on %s (%.0f MiB)", space_name, space.units.capacity, self.device,
                 space.units.capacity * space.unit_bytes / 2**20)

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
        """Place the adapter in its family's pools if it is not there, evicting idle ones to fit; None
        if it cannot fit now or its copy to the device has not completed yet (ask again next step).
        `weights`: what a family parses (server.families.base.AdapterWeights)."""
        entry = self.resident.get(weights.name)
        if entry is not None:
            if not self.ready(weights.name):
                return None
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
        hooked = FAMILIES[weights.family].step_hooks is not None  # its hook consults the weights every step
        try:
            step_weights = weights.on_device(self.device) if hooked else None
            rows = self._host_rows(weights, space)
            self._copy_in(space, rows, start, weights.units)
        except Exception:  # the adapter's weights do not fit its own description (or the device is full): give its units back
            space.units.release(start, weights.units)
            raise
        ticket = self.transfers.record()
        entry = ResidentAdapter(weights.name, weights.family, weights.space, start, weights.units, weights.plan_units, weights.num_bytes,
                                step_weights, weights.targets)  # fmt: skip
        self.resident[weights.name] = entry
        space.resident_units += weights.units
        self.misses += 1
        if not self.transfers.done(ticket):
            entry.loading = (ticket, rows)  # the host rows must outlive the copy that reads them
            return None
        return entry

    def _host_rows(self, weights, space: SpacePools) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
        """(layer, module) -> pool name -> the adapter's unit range of that pool, laid out in host memory
        by its family (scales folded in), pinned for the transfer stream. Kept with the weights on CUDA."""
        rows = getattr(weights, "host_rows", None)
        if rows is not None and rows[0] == space.dtype:
            return rows[1]
        out = {}
        for layer, module in weights.modules:
            slot = self._targets[layer][module].slots[module]
            host = {name: torch.zeros((weights.units, *tail), dtype=dtype)
                    for name, (tail, dtype) in space.space.pools(slot.d_in, slot.d_out, space.dtype).items()}
            weights.write_into(host, layer, module, 0, space.dtype)
            for name, t in host.items():  # finite in the parser's dtype, yet maybe infinite in narrower pools (--lora-dtype)
                if t.is_floating_point() and torch.isinf(t).any():
                    raise InvalidAdapter(f"{weights.name}: {module} of layer {layer} overflows the {str(space.dtype)[6:]} "
                                         f"adapter pools: rescale the weights")
            out[(layer, module)] = {name: self.transfers.pin(t) for name, t in host.items()}
        if self.keep_host_rows and hasattr(weights, "host_rows"):
            weights.host_rows = (space.dtype, out)
        return out

    def _copy_in(self, space: SpacePools, rows: dict, start: int, units: int) -> None:
        """Zero the unit range in every pool of the space, then copy the adapter's rows in: on the
        transfer stream, after the compute already issued (the rows may be an evicted adapter's that a
        step in flight still reads)."""
        self.transfers.after_compute()
        with self.transfers.side():
            space.clear(start, units)
            for (layer, module), pools in rows.items():
                target = self._targets[layer][module].slots[module].pools
                for name, t in pools.items():
                    target[name][start : start + units].copy_(t, non_blocking=True)

    def wait_loads(self) -> None:
        """Block until every load in flight has landed (before pools are replaced or rows given back)."""
        for entry in self.resident.values():
            if entry.loading is not None:
                self.transfers.wait(entry.loading[0])
                entry.loading = None

    def add(self, weights, pinned: bool = False) -> ResidentAdapter:
        if weights.name in self.resident:
            raise ValueError(f"adapter {weights.name!r} is already resident")
        entry = self.ensure_resident(weights)
        if entry is None and weights.name in self.resident:  # placed, its copy still landing: wait for it
            self.wait_loads()
            entry = self.resident[weights.name]
        if entry is None:
            raise ValueError(f"adapter {weights.name!r} does not fit in the adapter budget next to the pinned/active ones")
        entry.pinned = pinned
        return entry

    def ready(self, name: str) -> bool:
        """Whether a resident adapter's copy to the device has completed (its requests may run)."""
        entry = self.resident[name]
        if entry.loading is not None:
            if not self.transfers.done(entry.loading[0]):
                return False
            entry.loading = None  # the host rows it copied from may go
        return True

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
        if entry.loading is not None:
            self.transfers.wait(entry.loading[0])
        del self.resident[name]
        space = self.spaces[entry.space]
        space.units.release(entry.row_start, entry.rank)
        space.resident_units -= entry.rank
        return True

    # -- internals -------------------------------------------------------------------------
    def _evict_one(self) -> bool:
        for name, entry in self.resident.items():  # least recently used first
            # a load in flight is never evicted; one that landed while nobody asked (its requests gone) is idle
            if not entry.active and not entry.pinned and self.ready(name):
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
                self.wait_loads()  # growing replaces the pools: no copy may still be landing in the old ones
                target = max(alloc.capacity * 2, alloc.capacity + units)
                space.grow(target if limit is None else min(target, max(limit, alloc.capacity + units)))
            elif not self._evict_one():  # fragmented: free more units
                return None
        return start
