"""Block manager invariants under thousands of random operations (property-based)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.generation.sampling import SamplingParams
from lmforge.serving.block_manager import BlockManager
from lmforge.serving.sequence import Sequence

OPS = st.lists(st.tuples(st.sampled_from(["new", "append", "fork", "free", "finish_prefill"]),
                         st.integers(0, 10**6)), min_size=50, max_size=400)


def check(bm: BlockManager, live: list[Sequence]) -> None:
    """Every block's count equals the tables that hold it; free blocks are exactly the unheld ones."""
    held = Counter(b for seq in live for b in seq.block_table)
    for block in bm.blocks:
        assert block.ref_count == held[block.block_id], f"block {block.block_id}"
        assert (block.ref_count == 0) == (block.block_id in bm.free)
    for h, block_id in bm.by_hash.items():
        assert bm.blocks[block_id].hash == h


@settings(max_examples=60, deadline=None)
@given(OPS, st.integers(1, 4), st.booleans())
def test_random_operations_keep_counts_exact(ops, bs_exp, caching):
    bm = BlockManager(num_blocks=24, block_size=2 ** bs_exp, prefix_caching=caching)
    live: list[Sequence] = []
    for op, r in ops:
        if op == "new":
            prompt = [r % 3 + 1] * (1 + r % 19)  # few distinct prompts, so prefixes repeat
            seq = Sequence(prompt, SamplingParams())
            seq.num_computed = bm.match_prefix(seq)
            if bm.ensure(seq, seq.num_tokens):
                live.append(seq)
            else:
                bm.free_seq(seq)
        elif live and op == "append":
            seq = live[r % len(live)]
            seq.output_ids.append(r % 7)
            if not bm.ensure(seq, seq.num_tokens):
                seq.output_ids.pop()  # out of blocks: the engine would preempt instead
            elif bm.free:
                copy = bm.writable_last_block(seq)
                if copy:
                    assert copy[0] != copy[1]
                seq.num_computed = seq.num_tokens
                bm.register_full_blocks(seq)
        elif live and op == "fork":
            parent = live[r % len(live)]
            child = Sequence(list(parent.prompt_ids), SamplingParams(), output_ids=list(parent.output_ids))
            bm.fork(parent, child)
            live.append(child)
        elif live and op == "finish_prefill":
            seq = live[r % len(live)]
            seq.num_computed = seq.num_tokens
            bm.register_full_blocks(seq)
        elif live and op == "free":
            bm.free_seq(live.pop(r % len(live)))
        check(bm, live)
    for seq in live:
        bm.free_seq(seq)
    check(bm, [])
    assert bm.num_free == len(bm.blocks)  # nothing leaked


def test_prefix_blocks_are_found_and_last_token_left_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = Sequence(list(range(12)), SamplingParams())
    bm.ensure(first, 12)
    first.num_computed = 12
    bm.register_full_blocks(first)
    bm.free_seq(first)
    again = Sequence(list(range(12)), SamplingParams())
    assert bm.match_prefix(again) == 8  # two of three blocks: the last token must be computed
    longer = Sequence(list(range(13)), SamplingParams())
    assert bm.match_prefix(longer) == 12


def test_least_recently_freed_cached_block_is_evicted_first():
    bm = BlockManager(num_blocks=2, block_size=2)
    a = Sequence([1, 2, 3], SamplingParams())
    bm.ensure(a, 3)
    a.num_computed = 2
    bm.register_full_blocks(a)
    bm.free_seq(a)  # block holding [1, 2] is cached, free
    b = Sequence([9, 9, 9], SamplingParams())
    assert bm.match_prefix(b) == 0 and bm.ensure(b, 1)  # takes the uncached free block first
    c = Sequence([1, 2, 5], SamplingParams())
    assert bm.match_prefix(c) == 2  # the cached block survived
