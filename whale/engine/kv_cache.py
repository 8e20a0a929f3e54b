"""Block accounting for the paged KV cache: fixed-size blocks, a block table per sequence, reference counts and
prefix caching.

A full block is keyed by a hash chained over its tokens and every token before it, so equal hashes mean equal
prefixes. A new sequence reuses every full cached block of its prompt. Blocks whose last user is gone go to the
free queue but keep their hash: they are still hits until they are handed out again, oldest first (LRU).
The storage itself (tensors per layer) lives in paged_attention.py; this module only hands out block ids.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

RELEASED = -1  # a windowed table's entry for a block released once out of the window


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[int, int] = {}  # prefix hash -> block id
        self.tables: dict[Hashable, list[int]] = {}
        self.hashed_blocks: dict[Hashable, int] = {}  # how many leading blocks of a sequence are registered
        # blocks handed out at least once: the free queue hands out never-used blocks first, in id order, so
        # these are blocks 0..n-1 (on CPU the cache's storage is resident only where written)
        self.blocks_written = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: Hashable) -> list[int]:
        return self.tables.get(seq_id, [])

    def prefix_hashes(self, token_ids: Sequence[int]) -> list[int]:
        """Chained hashes of every full block of `token_ids`."""
        hashes, previous = [], 0
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            previous = hash((previous, tuple(token_ids[start:start + self.block_size])))
            hashes.append(previous)
        return hashes

    def first_kept(self, num_tokens: int) -> int:
        """The first block a sequence of `num_tokens` computed tokens still needs (all of them here)."""
        return 0

    def cached_prefix(self, hashes: Sequence[int], blocks: int) -> bool:
        """Whether the blocks a sequence needs of its first `blocks` (their chained `hashes`) are all cached."""
        return all(h in self.cached for h in hashes[self.first_kept(blocks * self.block_size):blocks])

    def take_prefix(self, seq_id: Hashable, hashes: Sequence[int], blocks: int) -> None:
        """Start `seq_id`'s table with its first `blocks` blocks from the cache (RELEASED where not needed)."""
        first = self.first_kept(blocks * self.block_size)
        table = self.tables.setdefault(seq_id, [])
        assert not table, "take_prefix is for a sequence without blocks"
        table.extend([RELEASED] * first)
        for block_hash in hashes[first:blocks]:
            block = self.cached[block_hash]
            self._reuse(block)
            table.append(block)
        self.hashed_blocks[seq_id] = blocks

    def _take_free(self) -> int:
        block, _ = self.free_queue.popitem(last=False)  # least recently freed first
        old = self.block_hash[block]
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]  # evicted: its contents are about to be overwritten
        self.block_hash[block] = None
        self.ref_counts[block] = 1
        self.blocks_written = max(self.blocks_written, block + 1)
        return block

    def _reuse(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def allocate_prefix(self, seq_id: Hashable, prompt_ids: Sequence[int], use_cache: bool = True) -> int:
        """Start `seq_id`'s block table with its prompt's cached full blocks; returns the tokens served from
        cache. At least the last prompt token is always left to compute (its logits start generation).
        `use_cache=False`: every token is computed (its blocks are still registered for others)."""
        table = self.tables.setdefault(seq_id, [])
        assert not table, "allocate_prefix is for a sequence without blocks"
        hits = 0
        if self.enable_prefix_caching and use_cache:
            for block_hash in self.prefix_hashes(prompt_ids[:len(prompt_ids) - 1]):
                block = self.cached.get(block_hash)
                if block is None:
                    break
                self._reuse(block)
                table.append(block)
                hits += 1
        self.hashed_blocks[seq_id] = hits
        return hits * self.block_size

    def can_grow(self, seq_id: Hashable, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(self.block_table(seq_id)) <= self.num_free_blocks

    def grow(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Make `seq_id`'s table cover `num_tokens` tokens; False (and no change) if blocks run out."""
        if not self.can_grow(seq_id, num_tokens):
            return False
        table = self.tables.setdefault(seq_id, [])
        while len(table) < self.blocks_needed(num_tokens):
            table.append(self._take_free())
        return True

    def register_full_blocks(self, seq_id: Hashable, token_ids: Sequence[int], num_computed: int) -> None:
        """Make the sequence's newly computed full blocks available as prefix-cache hits."""
        if not self.enable_prefix_caching:
            return
        table = self.tables[seq_id]
        done = self.hashed_blocks.get(seq_id, 0)
        full = min(num_computed // self.block_size, len(table))
        if full <= done:
            return
        hashes = self.prefix_hashes(token_ids[:full * self.block_size])
        for index in range(done, full):
            block, block_hash = table[index], hashes[index]
            if block != RELEASED and self.block_hash[block] is None and block_hash not in self.cached:
                self.block_hash[block] = block_hash
                self.cached[block_hash] = block
        self.hashed_blocks[seq_id] = full

    def _release(self, block: int) -> None:
        """The last release of a block puts it at the back of the free queue."""
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_queue[block] = None

    def truncate(self, seq_id: Hashable, blocks: int) -> None:
        """Give back the sequence's blocks after its first `blocks` (the tail first)."""
        table = self.tables.get(seq_id, [])
        while len(table) > blocks:
            self._release(table.pop())
        self.hashed_blocks[seq_id] = min(self.hashed_blocks.get(seq_id, 0), blocks)

    def free(self, seq_id: Hashable) -> None:
        """Release the sequence's blocks."""
        # release the tail first, so a sequence's later blocks are evicted before its (more shared) prefix
        for block in reversed(self.tables.pop(seq_id, [])):
            if block != RELEASED:
                self._release(block)
        self.hashed_blocks.pop(seq_id, None)


class WindowedBlockManager(BlockManager):
    """Blocks of stores a step reads only for the last `retain` tokens before it (DeepSeek-V4's window rows and
    compressor inputs): a block wholly older than that is released as its sequence advances (its table entry
    becomes RELEASED). A released block keeps its hash, so it stays a prefix hit until it is handed out again."""

    def __init__(self, num_blocks: int, block_size: int, retain: int, enable_prefix_caching: bool = True):
        super().__init__(num_blocks, block_size, enable_prefix_caching)
        self.retain = retain

    def first_kept(self, num_tokens: int) -> int:
        return max(0, num_tokens - self.retain) // self.block_size

    def release_old(self, seq_id: Hashable, num_computed: int) -> None:
        table = self.tables.get(seq_id, [])
        for index in range(min(self.first_kept(num_computed), len(table))):
            if table[index] != RELEASED:
                self._release(table[index])
                table[index] = RELEASED

    def register_full_blocks(self, seq_id: Hashable, token_ids: Sequence[int], num_computed: int) -> None:
        super().register_full_blocks(seq_id, token_ids, num_computed)
        self.release_old(seq_id, num_computed)


class PooledBlockManager:
    """Several block pools behind BlockManager's interface, a sequence growing in each: the main one (its
    `block_table`, its `block_size`) and others by name: pools of larger blocks (a store with one row per 128
    tokens keeps one row a block, not one per 16-token block), a windowed pool. A prefix hit counts only what
    every pool holds (the windowed pool's blocks from the window before the hit on)."""

    def __init__(self, main: BlockManager, others: dict[str, BlockManager]):
        self.main, self.pools = main, {"main": main, **others}
        self.block_size, self.enable_prefix_caching = main.block_size, main.enable_prefix_caching

    @property
    def num_blocks(self) -> int:
        return self.main.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.main.num_free_blocks

    @property
    def blocks_written(self) -> int:
        return self.main.blocks_written

    def blocks_needed(self, num_tokens: int) -> int:
        return self.main.blocks_needed(num_tokens)

    def block_table(self, seq_id: Hashable) -> list[int]:
        return self.main.block_table(seq_id)

    def allocate_prefix(self, seq_id: Hashable, prompt_ids: Sequence[int], use_cache: bool = True) -> int:
        hits = self.main.allocate_prefix(seq_id, prompt_ids, use_cache)
        # each other pool's chained hashes (its own block size), computed once
        others = [(pool, pool.prefix_hashes(prompt_ids[:hits])) for name, pool in self.pools.items() if name != "main"]
        while hits and not all(pool.cached_prefix(hashes, hits // pool.block_size) for pool, hashes in others):
            hits -= self.block_size
        self.main.truncate(seq_id, hits // self.block_size)  # what the other pools cannot serve: given back
        for pool, hashes in others:
            pool.take_prefix(seq_id, hashes, hits // pool.block_size)
        return hits

    def can_grow(self, seq_id: Hashable, num_tokens: int) -> bool:
        return all(pool.can_grow(seq_id, num_tokens) for pool in self.pools.values())

    def grow(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Every pool's table made to cover `num_tokens` tokens; False (and no change) if one runs out."""
        if not self.can_grow(seq_id, num_tokens):
            return False
        return all([pool.grow(seq_id, num_tokens) for pool in self.pools.values()])

    def register_full_blocks(self, seq_id: Hashable, token_ids: Sequence[int], num_computed: int) -> None:
        for pool in self.pools.values():
            pool.register_full_blocks(seq_id, token_ids, num_computed)

    def free(self, seq_id: Hashable) -> None:
        for pool in self.pools.values():
            pool.free(seq_id)
