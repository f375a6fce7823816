"""Prefix caching keyed by adapter identity (server.engine.block_manager, server.engine.prefix_cache).

Bookkeeping first (no model), then the engine: a prompt served again reuses its full blocks and
gives the same greedy tokens as computing them; blocks are never shared across identities.
"""
from __future__ import annotations

import pytest

from server.engine.block_manager import BlockManager
from server.engine.prefix_cache import block_hashes
from server.engine.sequence import SamplingParams, Sequence

BS = 4


def seq_of(tokens: list[int], **kw) -> Sequence:
    return Sequence(list(tokens), SamplingParams(max_tokens=4), **kw)


def run_prefill(bm: BlockManager, seq: Sequence, identity: str) -> list[int]:
    """Admit seq as the scheduler does, compute every token, publish its full blocks; returns the hits."""
    hits = bm.lookup(seq, identity)
    bm.take_cached(seq, hits, seq.num_tokens)
    assert bm.ensure(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq, identity)
    return hits


def test_hashes_chain_over_blocks_and_start_from_the_identity():
    a = block_hashes(list(range(8)), BS, "", None)
    assert len(a) == 2 and a[0] != a[1]
    assert block_hashes(list(range(4, 8)), BS, "", a[0]) == a[1:]  # extending the chain gives the same names
    assert block_hashes(list(range(8)), BS, "sha-of-adapter", None)[0] != a[0]
    assert block_hashes([0, 1, 2, 4, 4, 5, 6, 7], BS, "", None)[1] != a[1]  # a token earlier changes every later block


def test_a_second_sequence_takes_the_full_blocks_of_the_first_and_computes_the_rest():
    bm = BlockManager(16, BS)
    first = seq_of(list(range(10)))  # blocks [0-3] [4-7] full, [8-9] partial
    assert run_prefill(bm, first, "") == []
    second = seq_of(list(range(8)) + [99, 98, 97])
    hits = run_prefill(bm, second, "")
    assert hits == first.block_table[:2] and second.num_cached_tokens == 8
    assert second.block_table[:2] == first.block_table[:2] and second.block_table[2] not in first.block_table
    assert bm.ref_counts[hits[0]] == 2
    assert (bm.queried_tokens, bm.hit_tokens) == (21, 8)


def test_one_token_is_always_left_to_compute():
    bm = BlockManager(16, BS)
    run_prefill(bm, seq_of(list(range(8))), "")
    again = seq_of(list(range(8)))
    assert len(bm.lookup(again, "")) == 1  # the second block holds the last token: it is computed again


@pytest.mark.parametrize("other", ["adapter-v2", "adapter-v1#state=other"])
def test_blocks_are_never_shared_across_identities(other):
    bm = BlockManager(16, BS)
    run_prefill(bm, seq_of(list(range(12))), "adapter-v1")
    assert bm.lookup(seq_of(list(range(12))), other) == []
    assert bm.lookup(seq_of(list(range(12))), "") == []
    assert len(bm.lookup(seq_of(list(range(12))), "adapter-v1")) == 2


def test_freed_blocks_stay_findable_until_handed_out_least_recently_used_first():
    bm = BlockManager(4, BS)
    old = seq_of(list(range(8)) + [0])
    run_prefill(bm, old, "")
    kept = list(old.block_table)
    bm.free(old)
    assert bm.num_free == 4 and bm.num_used == 0
    # the unhashed last block and then the sequence's later blocks are handed out first
    other = seq_of([50, 51])
    assert bm.ensure(other, 2) and other.block_table == [kept[2]]
    assert len(bm.lookup(seq_of(list(range(8)) + [7]), "")) == 2
    assert bm.ensure(other, 4 * 3)  # two more: the never-used block, then the prefix's later block
    assert bm.lookup(seq_of(list(range(8)) + [7]), "") == [kept[0]]  # a prefix's head is evicted last
    assert bm.ensure(other, 4 * 4)
    assert bm.lookup(seq_of(list(range(8)) + [7]), "") == [] and not bm.cached


def test_a_block_computed_twice_stays_with_the_first_and_the_copy_is_freed():
    bm = BlockManager(8, BS)
    a, b = seq_of(list(range(6))), seq_of(list(range(6)))
    for s in (a, b):  # admitted in one step: neither finds the other's blocks
        bm.take_cached(s, bm.lookup(s, ""), s.num_tokens)
        bm.ensure(s, s.num_tokens)
    for s in (a, b):
        s.num_computed_tokens = s.num_tokens
        bm.cache_full_blocks(s, "")
    kept = a.block_table[0]
    assert bm.cached == {a.block_hashes[0]: kept}
    bm.free(b)
    bm.free(a)
    assert bm.num_free == 8 and bm.lookup(seq_of(list(range(6))), "") == [kept]


def test_prefix_caching_off_finds_nothing():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    run_prefill(bm, seq_of(list(range(9))), "")
    assert bm.lookup(seq_of(list(range(9))), "") == [] and not bm.cached


# -- the engine ---------------------------------------------------------------------------------
SYSTEM = "You are a helpful assistant for the support desk of a bicycle shop. Answer briefly and politely. " * 2


def _greedy(engine, jobs, max_tokens=8, identity=None):
    seqs = [Sequence(engine.tokenizer(p)["input_ids"], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), a,
                     prefix_identity=identity if a else "") for p, a in jobs]
    for s in seqs:
        engine.add(s)
    while engine.has_work():
        engine.step()
    return seqs


@pytest.mark.parametrize("adapter", [None, "r8-all"])
def test_the_engine_reuses_a_shared_prefix_with_the_tokens_of_a_full_computation(engine, adapter):
    bm = engine.block_manager
    questions = [SYSTEM + "Q: Do you sell helmets?", SYSTEM + "Q: When do you open?"]
    bm.enable_prefix_caching = False
    try:
        fresh = [s.output_token_ids for s in _greedy(engine, [(q, adapter) for q in questions], identity="id-" + str(adapter))]
    finally:
        bm.enable_prefix_caching = True
    first = _greedy(engine, [(questions[0], adapter)], identity="id-" + str(adapter))[0]
    hits_before = bm.hit_tokens
    second = _greedy(engine, [(questions[1], adapter)], identity="id-" + str(adapter))[0]
    shared = len(engine.tokenizer(SYSTEM)["input_ids"]) // bm.block_size * bm.block_size
    assert second.num_cached_tokens >= shared - bm.block_size > 0
    assert bm.hit_tokens - hits_before == second.num_cached_tokens
    assert [first.output_token_ids, second.output_token_ids] == fresh


def test_the_engine_shares_no_blocks_between_adapters_or_with_the_base(engine):
    prompt = "Say it again. " + SYSTEM + "Q: Can I rent a bike?"  # no earlier test served this prefix
    _greedy(engine, [(prompt, "r4-qv")], identity="iso-r4-qv")
    assert _greedy(engine, [(prompt, "r8-all")], identity="iso-r8-all")[0].num_cached_tokens == 0
    assert _greedy(engine, [(prompt, None)])[0].num_cached_tokens == 0
    assert _greedy(engine, [(prompt, "r4-qv")])[0].num_cached_tokens == 0  # no identity given: no sharing
    assert _greedy(engine, [(prompt, "r4-qv")], identity="iso-r4-qv")[0].num_cached_tokens > 0


def test_the_engine_shares_blocks_within_a_tenant_only(engine):
    """A cache shared across tenants would let one time another's prompts (the base model and public
    adapters are used by many): each tenant finds only its own blocks."""
    prompt = "Tenants apart. " + SYSTEM + "Q: Is the shop open today?"

    def cached(tenant):
        seq = Sequence(engine.tokenizer(prompt)["input_ids"], SamplingParams(max_tokens=2, temperature=0.0), tenant=tenant)
        engine.add(seq)
        while engine.has_work():
            engine.step()
        return seq.num_cached_tokens

    assert cached("acme") == 0
    assert cached("globex") == 0
    assert cached(None) == 0  # the admin is a caller of its own too
    assert cached("acme") > 0 and cached("globex") > 0
