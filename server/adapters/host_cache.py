"""Host-RAM tier: parsed adapter weights, least recently used first out, within a byte budget.

A request that uses an adapter holds a reference to its weights, so dropping them here never
pulls them from under a running request; it only means the next cold request fetches again.
"""
from __future__ import annotations

from collections import OrderedDict

from server.lora.peft import LoraWeights


class HostCache:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, LoraWeights] = OrderedDict()
        self.bytes_used = 0
        self.evictions = 0

    def get(self, key: str) -> LoraWeights | None:
        weights = self._entries.get(key)
        if weights is not None:
            self._entries.move_to_end(key)
        return weights

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def put(self, key: str, weights: LoraWeights) -> None:
        if key in self._entries:
            return
        self._entries[key] = weights
        self.bytes_used += weights.num_bytes
        while self.bytes_used > self.budget_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            self.bytes_used -= old.num_bytes
            self.evictions += 1

    def drop_matching(self, prefix: str) -> None:
        for key in [k for k in self._entries if k.startswith(prefix)]:
            self.drop(key)

    def drop(self, key: str) -> None:
        weights = self._entries.pop(key, None)
        if weights is not None:
            self.bytes_used -= weights.num_bytes
