"""Paged KV-cache bookkeeping (PagedAttention's block tables), in plain Python.

The cache is `num_blocks` fixed-size blocks. A sequence owns a table of block ids; a block
is shared by reference count. Full blocks are named by a hash of their tokens chained to
the previous block's hash, so identical prompt prefixes reuse blocks (prefix caching).
Blocks whose count drops to zero stay findable by hash until they are reused, least
recently freed first (Kwon et al. 2023, https://arxiv.org/abs/2309.06180).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from lmforge.serving.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and registered for reuse
    tokens: tuple[int, ...] = ()  # the tokens behind `hash`, checked on every match


class BlockManager:
    """Allocates, shares, copies-on-write and frees KV blocks for sequences."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size, self.prefix_caching = block_size, prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.by_hash: dict[int, int] = {}
        self.prefix_queries = self.prefix_hits = 0  # prompt tokens looked up / found

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return len(self.blocks) - len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """How many new blocks `seq` needs so that `num_tokens` slots exist."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def _take(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict the cached content it held
            if self.by_hash.get(block.hash) == block_id:
                del self.by_hash[block.hash]
            block.hash, block.tokens = None, ()
        block.ref_count = 1
        return block_id

    def _share(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def match_prefix(self, seq: Sequence) -> int:
        """Adopt cached blocks for the prompt's leading full blocks; return the tokens reused.

        At least one prompt token is always left to compute, so the step that finishes the
        prompt has logits to sample from and never writes into a shared block.
        """
        assert not seq.block_table and seq.num_computed == 0
        if not self.prefix_caching:
            return 0
        ids, parent, reused = seq.prompt_ids, seq.adapter, 0  # an adapter's keys differ: its own chain
        self.prefix_queries += len(ids)
        while reused + self.block_size < len(ids):
            tokens = tuple(ids[reused:reused + self.block_size])
            h = hash((parent, tokens))
            block_id = self.by_hash.get(h)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            self._share(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            parent, reused = h, reused + self.block_size
        self.prefix_hits += reused
        return reused

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s table to hold `num_tokens` slots; False (nothing changed) if blocks run out."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self.free):
            return False
        seq.block_table.extend(self._take() for _ in range(needed))
        return True

    def writable_last_block(self, seq: Sequence) -> tuple[int, int] | None:
        """Copy-on-write: if the block that gets the next slot is shared, give `seq` its own copy.

        Returns (source, destination) block ids whose contents the caller must copy, or None.
        """
        index = seq.num_computed // self.block_size
        if index >= len(seq.block_table):
            return None
        block_id = seq.block_table[index]
        if self.blocks[block_id].ref_count == 1:
            return None
        if not self.free:
            raise MemoryError("no free block for copy-on-write")
        new_id = self._take()
        self.blocks[block_id].ref_count -= 1
        seq.block_table[index] = new_id
        return block_id, new_id

    def register_full_blocks(self, seq: Sequence) -> None:
        """Name each newly full block of `seq` by its chained content hash, for reuse."""
        if not self.prefix_caching:
            return
        bs, ids = self.block_size, None
        while len(seq.block_hashes) < seq.num_computed // bs:
            index = len(seq.block_hashes)
            ids = ids or seq.all_ids
            tokens = tuple(ids[index * bs:(index + 1) * bs])
            h = hash((seq.block_hashes[-1] if seq.block_hashes else seq.adapter, tokens))
            block = self.blocks[seq.block_table[index]]
            if block.hash is None and h not in self.by_hash:
                block.hash, block.tokens = h, tokens
                self.by_hash[h] = block.block_id
            seq.block_hashes.append(h)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Free the blocks of `seq` past the first `num_tokens` slots (rejected draft tokens' blocks)."""
        keep = -(-num_tokens // self.block_size)
        for block_id in reversed(seq.block_table[keep:]):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed more often than taken"
            if block.ref_count == 0:
                self.free[block_id] = None
        del seq.block_table[keep:]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares all of `parent`'s blocks (parallel sampling, n > 1)."""
        for block_id in parent.block_table:
            self._share(block_id)
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed = parent.num_computed

    def free_seq(self, seq: Sequence) -> None:
        """Drop `seq`'s references; unreferenced blocks become reusable (hashed ones last)."""
        self.trim(seq, 0)
        seq.block_hashes = []
        seq.num_computed = 0
