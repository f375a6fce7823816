"""Paged KV-cache bookkeeping: fixed-size blocks handed out to sequences and taken back."""
from __future__ import annotations

from collections import deque

from server.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.fresh: list[int] = []  # handed out since the model runner last cleared them (take_fresh)

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` enough blocks to hold `num_tokens` tokens; False (and no change) if there are too few free."""
        missing = self.blocks_needed(num_tokens) - len(seq.block_table)
        if missing <= 0:
            return True
        if missing > len(self.free_blocks):
            return False
        new = [self.free_blocks.popleft() for _ in range(missing)]
        seq.block_table.extend(new)
        self.fresh.extend(new)
        return True

    def take_fresh(self) -> list[int]:
        """Blocks handed out since the last call: their contents are whatever an earlier owner left."""
        fresh, self.fresh = self.fresh, []
        return fresh

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
