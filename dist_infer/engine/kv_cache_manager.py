"""Per-request block tables over the block pools of the KV-cache groups, with prefix caching (plain Python).

Each KV-cache group (``kv_cache_groups``: the full-attention layers, each sliding window's layers) has its own
pool and its own table per request. In a group's table, token ``m`` of a request lives in block
``table[m // block_size]`` at offset ``m % block_size``; a request holding ``n`` tokens has ``ceil(n / block_size)``
entries. In a sliding group, entries wholly before the window of the request's next query are given back as the
request advances and replaced by the pool's null block, so a long request holds about ``w / block_size + 1``
blocks there (plus the chunk being computed) while its full-attention table grows with its context.

A full block is keyed by ``sha256(key of the previous block || its tokens)``, so equal prefixes give equal chains of
keys (and different prefixes, in practice, never do) and a new request can start from the longest chain already
cached. Every group caches its blocks under the same keys. A prefix hit of ``k`` blocks needs the full groups'
blocks ``0 .. k-1`` and each sliding group's blocks covering the window before position ``k * block_size``
(``first_kept_block .. k-1``; the earlier ones are nulls); the longest ``k`` for which all of them are cached wins.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from dist_infer.engine.block_pool import BlockPool, KVCacheBlock
from dist_infer.kv_cache_groups import KVCacheGroups, cdiv


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
    """``num_blocks``: usable blocks per group (an int: the same for every group)."""

    def __init__(self, num_blocks: int | Sequence[int], block_size: int, enable_prefix_caching: bool = True,
                 groups: KVCacheGroups = KVCacheGroups()):
        counts = [num_blocks] * len(groups) if isinstance(num_blocks, int) else list(num_blocks)
        if len(counts) != len(groups):
            raise ValueError(f"num_blocks has {len(counts)} entries for {len(groups)} KV-cache groups")
        self.block_size, self.groups = block_size, groups
        self.pools = [BlockPool(n, enable_prefix_caching, groups.is_sliding(g)) for g, n in enumerate(counts)]
        self.pool = self.pools[0]
        # Per request, per group: its table, and how many of its leading entries were given back (nulls).
        self.block_tables: dict[str, list[list[KVCacheBlock]]] = {}
        self._num_null: dict[str, list[int]] = {}
        # Block keys of each request's full blocks, extended as its tokens grow.
        self._keys: dict[str, list[bytes]] = {}
        # How many of each request's leading blocks are already keyed in the pools.
        self._num_keyed: dict[str, int] = {}

    # ---- sizes ---------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return sum(self.group_num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return sum(self.group_free_blocks)

    @property
    def group_num_blocks(self) -> tuple[int, ...]:
        return tuple(pool.num_blocks for pool in self.pools)

    @property
    def group_free_blocks(self) -> tuple[int, ...]:
        return tuple(pool.num_free_blocks for pool in self.pools)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def max_blocks_held(self, num_tokens: int, max_chunk: int) -> list[int]:
        """Per group, the most blocks one request of ``num_tokens`` tokens holds at once."""
        return [self.groups.max_blocks_held(g, num_tokens, max_chunk, self.block_size) for g in range(len(self.pools))]

    def block_ids(self, request_id: str, group: int = 0) -> list[int]:
        tables = self.block_tables.get(request_id)
        return [b.block_id for b in tables[group]] if tables else []

    def num_null(self, request_id: str) -> tuple[int, ...]:
        """Per group, how many leading entries of the request's table are the null block now."""
        return tuple(self._num_null.get(request_id, [0] * len(self.pools)))

    # ---- prefix cache --------------------------------------------------------------------------------
    def _block_keys(self, request_id: str, token_ids: list[int], num_tokens: int) -> list[bytes]:
        """Keys of the full blocks among the first ``num_tokens`` tokens, computed once per block."""
        return block_keys(token_ids, num_tokens, self.block_size, self._keys.setdefault(request_id, []))

    def get_computed_blocks(self, request_id: str, token_ids: list[int],
                            max_tokens: int | None = None) -> tuple[list[list[KVCacheBlock]], int]:
        """Per group, the blocks of the longest usable cached prefix (see the module), and how many tokens it covers.

        At least one token is always left to compute, since the model must run on the last one to sample.
        ``max_tokens`` caps the prefix (a request that still needs the hidden states of its later tokens: prompt
        logprobs); with 0 nothing is looked up."""
        limit = len(token_ids) - 1 if max_tokens is None else min(max_tokens, len(token_ids) - 1)
        if not self.pool.enable_caching or limit < self.block_size:
            return [[] for _ in self.pools], 0
        keys = self._block_keys(request_id, token_ids, limit)
        found, num_hit = [], len(keys)
        for pool in self.pools:
            if pool.null_block is None:  # full attention: the prefix up to the first miss
                hits = []
                for key in keys[:num_hit]:
                    if (block := pool.lookup(key)) is None:
                        break
                    hits.append(block)
                num_hit = len(hits)
            else:
                hits = [pool.lookup(key) for key in keys]
            found.append(hits)
        # A sliding group missing block j of the window rules out every prefix longer than j blocks (shorter
        # prefixes' windows start no later), so the search jumps there.
        while num_hit and (missing := self._last_window_miss(found, num_hit)) is not None:
            num_hit = missing
        tables = []
        for g, (pool, hits) in enumerate(zip(self.pools, found)):
            first = self.groups.first_kept_block(g, num_hit * self.block_size, self.block_size)
            tables.append([pool.null_block] * first + hits[first:num_hit])
        return tables, num_hit * self.block_size

    def _last_window_miss(self, found: list[list[KVCacheBlock | None]], num_hit: int) -> int | None:
        """The last block a prefix of ``num_hit`` blocks must keep in some sliding group but is not cached there
        (None: every group holds them)."""
        missing = None
        for g, hits in enumerate(found):
            if not self.groups.is_sliding(g):  # its hits end at its first miss
                continue
            first = self.groups.first_kept_block(g, num_hit * self.block_size, self.block_size)
            for j in range(num_hit - 1, first - 1, -1):
                if hits[j] is None:
                    missing = j if missing is None else max(missing, j)
                    break
        return missing

    # ---- allocation ----------------------------------------------------------------------------------
    def allocate_slots(self, request_id: str, token_ids: list[int], num_computed: int, num_new: int,
                       computed_blocks: list[list[KVCacheBlock]] | None = None) -> list[list[int]] | None:
        """Grows the request's tables to hold ``num_computed + num_new`` tokens, starting from ``computed_blocks``
        (prefix-cache hits, per group) for a request that holds none yet, after giving back the sliding blocks
        its queries from ``num_computed`` on never read. Returns per group the ids of the blocks added (hits and
        nulls included), or None -- allocating nothing -- when a pool is short."""
        tables = self.block_tables.get(request_id)
        self.release_out_of_window(request_id, num_computed)
        hits = computed_blocks or [[] for _ in self.pools]
        want = self.blocks_for(num_computed + num_new)
        needs = []
        for g, pool in enumerate(self.pools):
            need = max(want - (len(tables[g]) if tables is not None else len(hits[g])), 0)
            # Hits that sit free in the queue stop being available for new blocks once taken.
            revived = sum(1 for b in hits[g] if b.ref_cnt == 0 and b is not pool.null_block)
            if need > pool.num_free_blocks - revived:
                return None
            needs.append(need)
        if tables is None:
            tables = self.block_tables[request_id] = [[] for _ in self.pools]
            self._num_null[request_id] = [sum(b is pool.null_block for b in h) for pool, h in zip(self.pools, hits)]
        added = []
        for pool, table, group_hits, need in zip(self.pools, tables, hits, needs):
            pool.touch([b for b in group_hits if b is not pool.null_block])
            new = list(group_hits) + pool.take(need)
            table.extend(new)
            added.append([b.block_id for b in new])
        self._cache_full_blocks(request_id, token_ids, tables, num_computed + num_new)
        return added

    def release_out_of_window(self, request_id: str, num_computed: int) -> None:
        """Gives back each sliding group's blocks that no query from position ``num_computed`` on reads (the
        request has computed ``num_computed`` tokens; nothing for a request that holds no blocks)."""
        tables, num_null = self.block_tables.get(request_id), self._num_null.get(request_id)
        if tables is None:
            return
        for g, pool in enumerate(self.pools):
            first = self.groups.first_kept_block(g, num_computed, self.block_size)
            if first <= num_null[g]:
                continue
            table = tables[g]
            pool.release([b for b in table[num_null[g]:first] if b is not pool.null_block])
            table[num_null[g]:first] = [pool.null_block] * (first - num_null[g])
            num_null[g] = first

    def _cache_full_blocks(self, request_id: str, token_ids: list[int], tables: list[list[KVCacheBlock]],
                           total: int) -> None:
        if not self.pool.enable_caching:
            return
        keys = self._block_keys(request_id, token_ids, total)
        start, full = self._num_keyed.get(request_id, 0), total // self.block_size
        for pool, table in zip(self.pools, tables):
            for i in range(start, full):
                block = table[i]
                if block.key is None and block is not pool.null_block:  # a prefix hit already carries its key
                    pool.cache(block, keys[i])
        self._num_keyed[request_id] = max(start, full)

    def free(self, request_id: str, num_computed_tokens: int | None = None) -> None:
        """Returns the request's blocks; its last blocks are queued first so shared prefixes outlive tails.

        ``num_computed_tokens``: how many of its tokens the model has actually computed, when that is fewer
        than its blocks were cached for (a request preempted in the step that scheduled them): blocks past
        that point are taken out of the prefix cache, as they may never have been written."""
        tables = self.block_tables.pop(request_id, None) or [[] for _ in self.pools]
        self._num_null.pop(request_id, None)
        self._keys.pop(request_id, None)
        self._num_keyed.pop(request_id, None)
        for pool, table in zip(self.pools, tables):
            if num_computed_tokens is not None:
                for block in table[num_computed_tokens // self.block_size:]:
                    pool.uncache(block)
            pool.release(reversed([b for b in table if b is not pool.null_block]))
