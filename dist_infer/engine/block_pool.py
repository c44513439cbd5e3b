"""The pool of KV-cache blocks: reference counts, the free queue, and the prefix cache (plain Python).

A block is *cached* once it is full and its contents are known: it is then findable by its key (a digest
of the previous block's key and the tokens in this block), so a request whose prefix matches reuses it instead
of recomputing it. Blocks whose reference count drops to zero go to the back of the free queue but keep
their key; new blocks are taken from the front, so the least recently freed cached block is evicted first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

BlockKey = bytes  # digest of the previous block's key and this block's tokens


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    key: BlockKey | None = None


class BlockPool:
    """``num_blocks`` blocks to hand out. With ``null_block`` (a sliding-window group) block 0 is reserved on top
    of them: it stands in table entries whose block was given back, and is never handed out or cached."""

    def __init__(self, num_blocks: int, enable_caching: bool, null_block: bool = False):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks + null_block)]
        self.null_block = self.blocks[0] if null_block else None
        # block_id -> block, least recently freed first.
        self.free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks[int(null_block):])
        self.cached: dict[BlockKey, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def lookup(self, key: BlockKey) -> KVCacheBlock | None:
        return self.cached.get(key) if self.enable_caching else None

    def take(self, n: int) -> list[KVCacheBlock]:
        """``n`` blocks from the front of the free queue, evicting their cached contents; caller checked room."""
        out = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[KVCacheBlock]) -> None:
        """Takes a reference on cached blocks a new request shares (reviving them if they were free)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def release(self, blocks) -> None:
        """Drops one reference per block; blocks reaching zero join the free queue in the order given."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block

    def cache(self, block: KVCacheBlock, key: BlockKey) -> None:
        """Makes a full block findable under ``key``; a block already holding that key keeps it."""
        block.key = key
        if self.enable_caching:
            self.cached.setdefault(key, block)

    def uncache(self, block: KVCacheBlock) -> None:
        """Makes a block unfindable (its contents are not what its key says)."""
        self._evict(block)

    def _evict(self, block: KVCacheBlock) -> None:
        if block.key is not None and self.cached.get(block.key) is block:
            del self.cached[block.key]
        block.key = None
