from __future__ import annotations

import pytest

from pdray.engine.block_manager import BlockManager
from pdray.engine.sequence import Sequence
from pdray.sampling_params import SamplingParams


def make_seq(tokens: list[int], seq_id: str = "s") -> Sequence:
    return Sequence(seq_id, seq_id, 0, list(tokens), len(tokens), SamplingParams())


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    assert bm.grow(seq, len(seq))
    seq.num_computed_tokens = len(seq)
    bm.commit(seq)


def test_grow_and_free_restore_free_count():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    bm.match_prefix(seq)
    assert bm.grow(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.grow(seq, 12) and len(seq.block_table) == 3
    assert bm.grow(seq, 13) and len(seq.block_table) == 4
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []


def test_grow_fails_without_taking_blocks():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(list(range(12)))
    assert not bm.grow(seq, 12)
    assert bm.num_free_blocks == 2 and seq.block_table == []


def test_prefix_hit_reuses_blocks_and_never_covers_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = make_seq(list(range(12)), "a")
    bm.match_prefix(first)
    compute_all(bm, first)
    second = make_seq(list(range(12)), "b")
    bm.match_prefix(second)
    # 12 tokens = 3 full blocks, but the last token must be computed: only 2 blocks reused.
    assert second.num_cached_tokens == 8
    assert second.block_table == first.block_table[:2]
    assert bm.ref_counts[first.block_table[0]] == 2
    third = make_seq(list(range(8)) + [99, 98, 97, 96, 95], "c")
    bm.match_prefix(third)
    assert third.num_cached_tokens == 8
    for seq in (first, second, third):
        bm.free(seq)
    assert bm.num_free_blocks == 16


def test_cached_blocks_survive_free_until_evicted():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(list(range(9)), "a")
    bm.match_prefix(a)
    compute_all(bm, a)
    bm.free(a)
    b = make_seq(list(range(9)), "b")
    bm.match_prefix(b)
    assert b.num_cached_tokens == 8
    bm.free(b)
    # Fill the cache with other content: the old hashes must be evicted, not matched wrongly.
    c = make_seq([50 + i for i in range(16)], "c")
    bm.match_prefix(c)
    compute_all(bm, c)
    bm.free(c)
    d = make_seq(list(range(9)), "d")
    bm.match_prefix(d)
    assert d.num_cached_tokens == 0
    bm.free(d)
    assert bm.num_free_blocks == 4


def test_chained_hash_distinguishes_same_block_after_different_prefix():
    bm = BlockManager(num_blocks=16, block_size=2)
    a = make_seq([1, 2, 3, 4, 5], "a")
    bm.match_prefix(a)
    compute_all(bm, a)
    b = make_seq([9, 9, 3, 4, 5], "b")
    bm.match_prefix(b)
    assert b.num_cached_tokens == 0  # block [3, 4] matches only after prefix [1, 2]
    bm.free(a)
    bm.free(b)


def test_prefix_caching_off():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_seq(list(range(9)), "a")
    bm.match_prefix(a)
    compute_all(bm, a)
    b = make_seq(list(range(9)), "b")
    bm.match_prefix(b)
    assert b.num_cached_tokens == 0
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_double_free_detected():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(list(range(5)), "a")
    bm.grow(a, 5)
    table = list(a.block_table)
    bm.free(a)
    a.block_table = table
    with pytest.raises(RuntimeError, match="double free"):
        bm.free(a)
