"""Resident adapters: where each one's rows sit in the per-module row pools.

Every (layer, module) that some resident adapter targets has two pools, `lora_a (N, d_in)` and
`lora_b (N, d_out)` (Bᵀ with the scale folded in). An adapter of rank r owns rows
[row_start, row_start + r) in *every* pool, zero where it does not target the module, so one
per-step plan (segments -> row_start, rank) serves all modules. Pools grow when full.
"""
from __future__ import annotations

import logging
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
    num_bytes: int


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
    def __init__(self, model: LlamaForCausalLM, initial_rows: int = 256):
        self.model = model
        self.dtype = model.dtype
        self.rows = RowAllocator(initial_rows)
        self.resident: dict[str, ResidentAdapter] = {}
        self._targets = [layer.adapter_targets() for layer in model.layers]

    def get(self, name: str) -> ResidentAdapter | None:
        return self.resident.get(name)

    def add(self, weights: LoraWeights) -> ResidentAdapter:
        if weights.name in self.resident:
            raise ValueError(f"adapter {weights.name!r} is already resident")
        start = self.rows.allocate(weights.rank)
        if start is None:
            self._grow(max(self.rows.capacity * 2, self.rows.capacity + weights.rank))
            start = self.rows.allocate(weights.rank)
        for layer, module in weights.modules:
            self._ensure_pool(layer, module)
        for layer_targets in self._targets:
            for lin in set(layer_targets.values()):
                for slot in lin.slots.values():
                    if slot.lora_a is not None:
                        slot.lora_a[start : start + weights.rank].zero_()
                        slot.lora_b[start : start + weights.rank].zero_()
        for (layer, module), (a, b, scale) in weights.modules.items():
            slot = self._targets[layer][module].slots[module]
            r = a.shape[0]
            slot.lora_a[start : start + r] = a
            slot.lora_b[start : start + r] = (b.float().T * scale).to(self.dtype)
        entry = ResidentAdapter(weights.name, start, weights.rank, weights.num_bytes)
        self.resident[weights.name] = entry
        return entry

    def remove(self, name: str) -> None:
        entry = self.resident.pop(name)
        self.rows.release(entry.row_start, entry.rank)

    def _ensure_pool(self, layer: int, module: str) -> None:
        lin: AdaptedLinear = self._targets[layer][module]
        slot = lin.slots[module]
        if slot.lora_a is None:
            slot.lora_a = torch.zeros(self.rows.capacity, lin.in_features, dtype=self.dtype)
            slot.lora_b = torch.zeros(self.rows.capacity, slot.out_end - slot.out_start, dtype=self.dtype)
            lin.refresh_active()

    def _grow(self, capacity: int) -> None:
        log.info("growing adapter row pools from %d to %d rows", self.rows.capacity, capacity)
        for layer_targets in self._targets:
            for lin in set(layer_targets.values()):
                for slot in lin.slots.values():
                    if slot.lora_a is not None:
                        n = slot.lora_a.shape[0]
                        a = torch.zeros(capacity, slot.lora_a.shape[1], dtype=self.dtype)
                        b = torch.zeros(capacity, slot.lora_b.shape[1], dtype=self.dtype)
                        a[:n], b[:n] = slot.lora_a, slot.lora_b
                        slot.lora_a, slot.lora_b = a, b
        self.rows.grow(capacity)

    @property
    def pool_bytes(self) -> int:
        return sum(
            slot.lora_a.nbytes + slot.lora_b.nbytes
            for layer_targets in self._targets
            for lin in set(layer_targets.values())
            for slot in lin.slots.values()
            if slot.lora_a is not None
        )
