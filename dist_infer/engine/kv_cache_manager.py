"""Per-request block tables over the block pool, with prefix caching (plain Python).

Token ``m`` of a request lives in block ``table[m // block_size]`` at offset ``m % block_size``; a request
holding ``n`` tokens owns ``ceil(n / block_size)`` blocks. A full block is keyed by
``sha256(key of the previous block || its tokens)``, so equal prefixes give equal chains of keys (and
different prefixes, in practice, never do) and a new request can start from the longest chain already cached.
"""

from __future__ import annotations

import hashlib
from array import array

from dist_infer.engine.block_pool import BlockPool, KVCacheBlock


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_key(parent: bytes | None, tokens) -> bytes:
    """The prefix-cache key of a full block: a digest of its predecessor's key and its own tokens."""
    digest = hashlib.sha256(parent or b"")
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


def block_keys(token_ids: list[int], num_tokens: int, block_size: int, keys: list[bytes] | None = None) -> list[bytes]:
    """Keys of the full blocks among the first ``num_tokens`` tokens, extending ``keys`` (computed earlier)."""
    keys = [] if keys is None else keys
    parent = keys[-1] if keys else None
    for i in range(len(keys), num_tokens // block_size):
        parent = block_key(parent, token_ids[i * block_size:(i + 1) * block_size])
        keys.append(parent)
    return keys


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.block_tables: dict[str, list[KVCacheBlock]] = {}
        # Block keys of each request's full blocks, extended as its tokens grow.
        self._keys: dict[str, list[bytes]] = {}
        # How many of each request's leading blocks are already keyed in the pool.
        self._num_keyed: dict[str, int] = {}

    # ---- sizes ---------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.block_tables.get(request_id, ())]

    # ---- prefix cache --------------------------------------------------------------------------------
    def _block_keys(self, request_id: str, token_ids: list[int], num_tokens: int) -> list[bytes]:
        """Keys of the full blocks among the first ``num_tokens`` tokens, computed once per block."""
        return block_keys(token_ids, num_tokens, self.block_size, self._keys.setdefault(request_id, []))

    def get_computed_blocks(self, request_id: str, token_ids: list[int],
                            max_tokens: int | None = None) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of full blocks, and how many tokens it covers.

        At least one token is always left to compute, since the model must run on the last one to sample.
        ``max_tokens`` caps the prefix (a request that still needs the hidden states of its later tokens: prompt
        logprobs); with 0 nothing is looked up."""
        limit = len(token_ids) - 1 if max_tokens is None else min(max_tokens, len(token_ids) - 1)
        if not self.pool.enable_caching or limit < self.block_size:
            return [], 0
        hits = []
        for key in self._block_keys(request_id, token_ids, limit):
            block = self.pool.lookup(key)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    # ---- allocation ----------------------------------------------------------------------------------
    def allocate_slots(self, request_id: str, token_ids: list[int], num_computed: int, num_new: int,
                       computed_blocks: list[KVCacheBlock] = ()) -> list[int] | None:
        """Grows the request's table to hold ``num_computed + num_new`` tokens, starting from
        ``computed_blocks`` (prefix-cache hits) for a request that holds none yet. Returns the ids of the
        blocks added (hits included), or None -- allocating nothing -- when the pool is short."""
        table = self.block_tables.get(request_id, [])
        total = num_computed + num_new
        need = self.blocks_for(total) - len(table) - len(computed_blocks)
        # Hits that sit free in the queue stop being available for new blocks once taken.
        revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if need > self.pool.num_free_blocks - revived:
            return None
        self.pool.touch(list(computed_blocks))
        added = list(computed_blocks) + self.pool.take(max(need, 0))
        table = self.block_tables.setdefault(request_id, [])
        table.extend(added)
        self._cache_full_blocks(request_id, token_ids, table, total)
        return [b.block_id for b in added]

    def _cache_full_blocks(self, request_id: str, token_ids: list[int], table: list[KVCacheBlock], total: int) -> None:
        if not self.pool.enable_caching:
            return
        keys = self._block_keys(request_id, token_ids, total)
        start, full = self._num_keyed.get(request_id, 0), total // self.block_size
        for i in range(start, full):
            if table[i].key is None:  # a prefix hit already carries its key
                self.pool.cache(table[i], keys[i])
        self._num_keyed[request_id] = max(start, full)

    def free(self, request_id: str, num_computed_tokens: int | None = None) -> None:
        """Returns the request's blocks; its last blocks are queued first so shared prefixes outlive tails.

        ``num_computed_tokens``: how many of its tokens the model has actually computed, when that is fewer
        than its blocks were cached for (a request preempted in the step that scheduled them): blocks past
        that point are taken out of the prefix cache, as they may never have been written."""
        table = self.block_tables.pop(request_id, [])
        self._keys.pop(request_id, None)
        self._num_keyed.pop(request_id, None)
        if num_computed_tokens is not None:
            for block in table[num_computed_tokens // self.block_size:]:
                self.pool.uncache(block)
        self.pool.release(reversed(table))
