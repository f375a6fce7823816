"""Device-resident adapters: where each one's rows sit in the per-module row pools, within a byte budget.

Every (layer, module) that some resident adapter targets has two pools, `lora_a (N, d_in)` and
`lora_b (N, d_out)` (Bᵀ with the scale folded in). An adapter of rank r owns rows
[row_start, row_start + r) in *every* pool, zero where it does not target the module, so one
per-step plan (segments -> row_start, rank) serves all modules.

Residency is budgeted in bytes of pool memory (rows x bytes per row over all pools). When a new
adapter does not fit, the least recently used adapter that no running sequence uses and that is
not pinned is evicted. Only the engine thread calls this class.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from server.layers.linear import AdaptedLinear
from server.lora.peft import LoraWeights
from server.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ResidentAdapter:
    name: str
    row_start: int
    rank: int
    num_bytes: int  # of the adapter's own weights
    active: int = 0  # sequences admitted with it
    pinned: bool = False


class RowAllocator:
    """First-fit allocation of row ranges; adjacent free ranges merge on release."""

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


class AdapterManager:
    def __init__(self, model: LlamaForCausalLM, budget_bytes: int | None = None, initial_rows: int = 256):
        self.model = model
        self.dtype = model.dtype
        self.budget_bytes = budget_bytes  # None: grow without limit
        self.rows = RowAllocator(initial_rows)
        self.resident: OrderedDict[str, ResidentAdapter] = OrderedDict()  # least recently used first
        self._targets = [layer.adapter_targets() for layer in model.layers]
        self.evictions = self.hits = self.misses = 0

    # -- queries ---------------------------------------------------------------------------
    def get(self, name: str) -> ResidentAdapter | None:
        return self.resident.get(name)

    @property
    def row_bytes(self) -> int:
        """Bytes one pool row costs over every pool that exists (or would exist for a first adapter)."""
        per_row = sum(s.lora_a.shape[1] + s.lora_b.shape[1] for s in self._slots() if s.lora_a is not None)
        return per_row * self.dtype.itemsize

    @property
    def resident_bytes(self) -> int:
        return sum(e.rank for e in self.resident.values()) * self.row_bytes

    @property
    def pool_bytes(self) -> int:
        return self.rows.capacity * self.row_bytes

    # -- residency -------------------------------------------------------------------------
    def ensure_resident(self, weights: LoraWeights) -> ResidentAdapter | None:
        """Place the adapter in the pools if it is not there, evicting idle ones to fit; None if it cannot fit now."""
        entry = self.resident.get(weights.name)
        if entry is not None:
            self.touch(weights.name)
            return entry
        for layer, module in weights.modules:  # new pools first: they change what a row costs
            self._ensure_pool(layer, module)
        if self.budget_bytes is not None:
            if weights.rank * self.row_bytes > self.budget_bytes:
                raise ValueError(f"adapter {weights.name!r} needs {weights.rank * self.row_bytes} bytes, more than the whole adapter budget {self.budget_bytes}")
            while self.resident_bytes + weights.rank * self.row_bytes > self.budget_bytes:
                if not self._evict_one():
                    return None
        start = self._allocate(weights.rank)
        if start is None:
            return None
        self._write(start, weights)
        entry = ResidentAdapter(weights.name, start, weights.rank, weights.num_bytes)
        self.resident[weights.name] = entry
        self.misses += 1
        return entry

    def touch(self, name: str) -> None:
        """A request uses a resident adapter: a hit, and the most recently used now."""
        self.resident.move_to_end(name)
        self.hits += 1

    def add(self, weights: LoraWeights, pinned: bool = False) -> ResidentAdapter:
        if weights.name in self.resident:
            raise ValueError(f"adapter {weights.name!r} is already resident")
        entry = self.ensure_resident(weights)
        if entry is None:
            raise ValueError(f"adapter {weights.name!r} does not fit in the adapter budget next to the pinned/active ones")
        entry.pinned = pinned
        return entry

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
        self.rows.release(entry.row_start, entry.rank)
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

    def _allocate(self, rank: int) -> int | None:
        while (start := self.rows.allocate(rank)) is None:
            limit = None if self.budget_bytes is None else self.budget_bytes // max(1, self.row_bytes)
            if limit is None or self.rows.capacity < limit:
                target = max(self.rows.capacity * 2, self.rows.capacity + rank)
                self._grow(target if limit is None else min(target, max(limit, self.rows.capacity + rank)))
            elif not self._evict_one():  # fragmented: free more rows
                return None
        return start

    def _write(self, start: int, weights: LoraWeights) -> None:
        rank = weights.rank
        for slot in self._slots():
            if slot.lora_a is not None:
                slot.lora_a[start : start + rank].zero_()
                slot.lora_b[start : start + rank].zero_()
        for (layer, module), (a, b, scale) in weights.modules.items():
            slot = self._targets[layer][module].slots[module]
            r = a.shape[0]
            slot.lora_a[start : start + r] = a
            slot.lora_b[start : start + r] = (b.float().T * scale).to(self.dtype)

    def _slots(self):
        for layer_targets in self._targets:
            for module, lin in layer_targets.items():
                yield lin.slots[module]

    def _ensure_pool(self, layer: int, module: str) -> None:
        lin: AdaptedLinear = self._targets[layer][module]
        slot = lin.slots[module]
        if slot.lora_a is None:
            slot.lora_a = torch.zeros(self.rows.capacity, lin.in_features, dtype=self.dtype)
            slot.lora_b = torch.zeros(self.rows.capacity, slot.out_end - slot.out_start, dtype=self.dtype)
            lin.refresh_active()

    def _grow(self, capacity: int) -> None:
        log.info("growing adapter row pools from %d to %d rows", self.rows.capacity, capacity)
        for slot in self._slots():
            if slot.lora_a is not None:
                n = slot.lora_a.shape[0]
                a = torch.zeros(capacity, slot.lora_a.shape[1], dtype=self.dtype)
                b = torch.zeros(capacity, slot.lora_b.shape[1], dtype=self.dtype)
                a[:n], b[:n] = slot.lora_a, slot.lora_b
                slot.lora_a, slot.lora_b = a, b
        self.rows.grow(capacity)
