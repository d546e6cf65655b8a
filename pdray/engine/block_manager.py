"""Paged KV-cache block accounting with prefix caching. No torch: pure bookkeeping.

Block lifecycle:
  free (evictable, may still hold a cached hash) -> in use (ref_count >= 1) -> free again when the
  last owner releases it. A full block whose tokens are computed gets a chained hash
  (hash of parent hash + its tokens); a later sequence with the same prefix reuses it.

Rules: a sequence owns exactly the blocks of its block_table, each counted once in ref_count;
`free(seq)` releases them exactly once. Reuse never covers a prompt's last token, so every
prompt computes at least one token (the one whose logits give the first output token). A sequence
that scores its prompt (`reuse_prefix_cache` False) reuses nothing; its blocks are still published.
"""

from __future__ import annotations

from collections import OrderedDict

from pdray.engine.sequence import Sequence

_NO_HASH = -1


def chain_hash(parent_hash: int, token_ids: tuple[int, ...] | list[int]) -> int:
    """Deterministic across processes (ints and tuples of ints hash without a random seed)."""
    return hash((parent_hash, tuple(token_ids)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash = [_NO_HASH] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Free blocks in eviction order: least recently freed first.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation ---------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> None:
        """Attach cached blocks covering a prefix of a new sequence (before it computes anything)."""
        if seq.block_table or seq.num_computed_tokens:
            raise RuntimeError(f"{seq.seq_id}: prefix matching needs a fresh sequence")
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
        if not self.enable_prefix_caching or not seq.reuse_prefix_cache:
            return
        num_full = (len(seq) - 1) // self.block_size
        parent = _NO_HASH
        for i in range(num_full):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = chain_hash(parent, tokens)
            block = self.hash_to_block.get(h)
            if block is None or self.block_tokens[block] != tokens:
                break
            self._take(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_cached_tokens = seq.num_hashed_blocks * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens
        self.num_prefix_hits += seq.num_hashed_blocks

    def num_blocks_to_grow(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, self.blocks_needed(num_tokens) - len(seq.block_table))

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq's block table cover num_tokens tokens. False (nothing taken) if out of blocks."""
        need = self.num_blocks_to_grow(seq, num_tokens)
        if need > len(self.free_blocks):
            return False
        for _ in range(need):
            block, _ = self.free_blocks.popitem(last=False)
            self._evict_hash(block)
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def _evict_hash(self, block: int) -> None:
        h = self.block_hash[block]
        if h != _NO_HASH and self.hash_to_block.get(h) == block:
            del self.hash_to_block[h]
        self.block_hash[block] = _NO_HASH
        self.block_tokens[block] = None

    # -- after compute --------------------------------------------------------------------------

    def commit(self, seq: Sequence) -> None:
        """Publish hashes of seq's blocks that became full and computed, for later prefix reuse."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        parent = seq.block_hashes[-1] if seq.block_hashes else _NO_HASH
        for i in range(seq.num_hashed_blocks, num_full):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = chain_hash(parent, tokens)
            block = seq.block_table[i]
            if h not in self.hash_to_block and self.block_hash[block] == _NO_HASH:
                self.block_hash[block] = h
                self.block_tokens[block] = tokens
                self.hash_to_block[h] = block
            seq.block_hashes.append(h)
            parent = h
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)

    # -- release --------------------------------------------------------------------------------

    def free(self, seq: Sequence) -> None:
        """Release every block seq owns, exactly once. Idempotent for an empty table."""
        unhashed = []
        for block in seq.block_table:
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"double free of KV block {block} by {seq.seq_id}")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.block_hash[block] == _NO_HASH:
                    unhashed.append(block)
                else:
                    self.free_blocks[block] = None
        # Blocks without a hash are useless to keep: reuse them first, in ascending order, so
        # later allocations stay contiguous (KV transfer copies contiguous runs in one go).
        for block in reversed(unhashed):
            self.free_blocks[block] = None
            self.free_blocks.move_to_end(block, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0
