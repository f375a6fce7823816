"""Paged KV-cache bookkeeping: fixed-size blocks handed out to sequences and taken back, and the prefix
cache over them.

Prefix caching (vLLM's automatic prefix caching, keyed by adapter identity): a block whose
`block_size` tokens are all computed is named by a hash of its tokens, the hash of the block before
it, and — in the first block — the identity of what computed it (server.engine.prefix_cache). A
block's keys and values depend on exactly these, so a later sequence whose tokens and identity give
the same chain of hashes can take the blocks as they are instead of computing them. Blocks are
reference-counted: several running sequences can share one. A block nobody uses goes to the free
list but keeps its hash, so it can still be found, until it is handed out for new tokens: the free
list is in LRU order and evicts from the front.
"""
from __future__ import annotations

from collections import OrderedDict

from server.engine.prefix_cache import block_hashes
from server.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks  # a full block's hash while it is findable
        self.cached: dict[bytes, int] = {}  # hash -> block
        self.fresh: list[int] = []  # handed out since the model runner last cleared them (take_fresh)
        # tokens looked up at admission and tokens found (the prefix cache's hit rate)
        self.queried_tokens = self.hit_tokens = 0

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out (those only kept for the prefix cache included)."""
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- the prefix cache ------------------------------------------------------------------
    def lookup(self, seq: Sequence, identity: str) -> list[int]:
        """The cached blocks that hold seq's first tokens, computed under `identity` (no change made).
        At least one token is always left to compute: its logits are what the step samples from."""
        usable = (seq.num_tokens - 1) // self.block_size
        if not self.enable_prefix_caching or usable == 0:
            return []
        hits = []
        for h in self._hashes(seq, identity, usable):
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def num_free_among(self, blocks: list[int]) -> int:
        """How many of `blocks` sit in the free list (taking them shrinks it)."""
        return sum(1 for b in blocks if self.ref_counts[b] == 0)

    def take_cached(self, seq: Sequence, hits: list[int], queried: int) -> None:
        """Give a sequence that holds no blocks the cached blocks `hits` (from lookup): their tokens count as computed."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
        seq.block_table = list(hits)
        seq.num_published_blocks = len(hits)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        self.queried_tokens += queried
        self.hit_tokens += seq.num_cached_tokens

    def completed_blocks(self, seq: Sequence) -> bool:
        """Whether seq has full blocks not yet offered to the prefix cache (cheap: checked every step)."""
        return self.enable_prefix_caching and min(seq.num_computed_tokens // self.block_size, len(seq.block_table)) > seq.num_published_blocks

    def cache_full_blocks(self, seq: Sequence, identity: str) -> None:
        """Make seq's blocks whose tokens are all computed findable. A block computed twice (two sequences
        with one prefix admitted together) stays with the first: the second copy is freed as usual."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if full <= seq.num_published_blocks:
            return
        hashes = self._hashes(seq, identity, full)
        for i in range(seq.num_published_blocks, full):
            block, h = seq.block_table[i], hashes[i]
            if self.hash_of[block] is None and h not in self.cached:
                self.hash_of[block] = h
                self.cached[h] = block
        seq.num_published_blocks = full

    def _hashes(self, seq: Sequence, identity: str, count: int) -> list[bytes]:
        """The hashes of seq's first `count` full blocks, extending the ones it already has (memoised on
        the sequence: its tokens never change, and a preempted sequence finds them again)."""
        if seq.block_hashes_identity != identity:
            seq.block_hashes, seq.block_hashes_identity = [], identity
        have = len(seq.block_hashes)
        if have < count:
            bs = self.block_size
            seq.block_hashes += block_hashes(seq.token_ids(have * bs, count * bs), bs, identity,
                                             seq.block_hashes[-1] if have else None)
        return seq.block_hashes[:count]

    # -- blocks ----------------------------------------------------------------------------
    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` enough blocks to hold `num_tokens` tokens; False (and no change) if there are too few free."""
        missing = self.blocks_needed(num_tokens) - len(seq.block_table)
        if missing <= 0:
            return True
        if missing > len(self.free_blocks):
            return False
        for _ in range(missing):
            block, _ = self.free_blocks.popitem(last=False)
            h = self.hash_of[block]
            if h is not None:  # evicted from the prefix cache: its contents are about to be overwritten
                del self.cached[h]
                self.hash_of[block] = None
            self.ref_counts[block] = 1
            seq.block_table.append(block)
            self.fresh.append(block)
        return True

    def take_fresh(self) -> list[int]:
        """Blocks handed out since the last call: their contents are whatever an earlier owner left."""
        fresh, self.fresh = self.fresh, []
        return fresh

    def free(self, seq: Sequence) -> None:
        """seq gives its blocks back. The last blocks of a sequence are the least likely to be shared, so
        they go nearer the front of the free list (evicted first); blocks without a hash go to the very front."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                if self.hash_of[block] is None:
                    self.free_blocks.move_to_end(block, last=False)
        seq.block_table = []
        seq.num_published_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (blocks in use keep their contents; they are simply no longer findable)."""
        self.cached.clear()
        self.hash_of = [None] * self.num_blocks
