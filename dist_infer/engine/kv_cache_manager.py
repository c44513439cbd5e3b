"""Paged KV-cache bookkeeping (plain Python): a pool of fixed-size blocks and a block table per request.

Token ``m`` of a request lives in block ``table[m // block_size]`` at offset ``m % block_size``; a request
holding ``n`` tokens owns ``ceil(n / block_size)`` blocks.
"""

from __future__ import annotations

from collections import deque


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def num_held(self, request_id: str) -> int:
        return len(self.block_tables.get(request_id, ()))

    def allocate_slots(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Grows the request's table to hold ``num_tokens`` tokens; returns the new block ids, or None
        (allocating nothing) when the pool cannot supply them."""
        table = self.block_tables.setdefault(request_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need <= 0:
            return []
        if need > len(self.free_blocks):
            return None
        new = [self.free_blocks.popleft() for _ in range(need)]
        table.extend(new)
        return new

    def free(self, request_id: str) -> None:
        for block in self.block_tables.pop(request_id, ()):
            self.free_blocks.append(block)
