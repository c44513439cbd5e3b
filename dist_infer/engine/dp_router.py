"""Chooses the data-parallel replica for each new request (plain Python).

The caller passes, per request, the replicas allowed to take it (healthy, not draining) and their outstanding
work: ``route(token_ids, {replica index: outstanding tokens})``. Indexes are any ints; replicas come and go.

1. Prefix affinity: a request whose prompt starts with blocks an eligible replica has recently served goes to
   that replica (the blocks are likely still in its prefix cache), unless it is clearly busier than the least
   loaded one: ``load[owner] <= 1.5 * load[least] + len(prompt)``. The longest remembered prefix wins; an owner
   that is not eligible now is skipped, so a shorter prefix held by an eligible replica can still win.
2. Otherwise the least loaded replica. Replicas tied on the least load share the work round-robin: the tie goes
   to the first tied index after the replica that took the previous request (wrapping around), so idle
   replicas take turns instead of replica 0 taking everything.

``forget_replica(i)`` drops what replica i is remembered to hold (its cache was lost: failed, rebuilt, removed).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from dist_infer.engine.kv_cache_manager import block_keys

_MAX_REMEMBERED = 100_000
_AFFINITY_SLACK = 1.5  # the cached replica may carry up to this much more work than the least loaded


class DataParallelRouter:
    def __init__(self, block_size: int):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size
        self._prefix_owner: OrderedDict[bytes, int] = OrderedDict()  # block key (as the KV cache keys it) -> replica
        self._last: int | None = None  # the replica that took the previous request: where the tie rotation resumes

    def route(self, token_ids: list[int], loads: Mapping[int, int]) -> int:
        """The replica for a request with prompt ``token_ids``.

        ``loads``: {replica index: outstanding tokens} over the replicas eligible now. An empty ``loads`` is a
        ValueError: no replica can take it.
        """
        if not loads:
            raise ValueError("no eligible data-parallel replica to route the request to (all failed, "
                             "rebuilding or draining)")
        chain = block_keys(token_ids, len(token_ids), self.block_size)
        least_load = min(loads.values())
        choice = least = self._break_tie(sorted(i for i, load in loads.items() if load == least_load))
        for key in reversed(chain):  # the longest prefix an eligible replica has seen
            owner = self._prefix_owner.get(key)
            if owner is None or owner not in loads:
                continue
            if loads[owner] <= _AFFINITY_SLACK * loads[least] + len(token_ids):
                choice = owner
            break
        # Remembered even with one eligible replica: its cache is worth following once others join.
        for key in chain:
            self._prefix_owner[key] = choice
            self._prefix_owner.move_to_end(key)
        while len(self._prefix_owner) > _MAX_REMEMBERED:
            self._prefix_owner.popitem(last=False)
        self._last = choice
        return choice

    def forget_replica(self, index: int) -> None:
        """Forgets every prefix remembered on replica ``index`` (its KV cache is gone), so requests sharing
        those prefixes are routed by load again."""
        for key in [key for key, owner in self._prefix_owner.items() if owner == index]:
            del self._prefix_owner[key]

    def _break_tie(self, tied: list[int]) -> int:
        """The first of ``tied`` (sorted) after the previous request's replica, wrapping around."""
        if self._last is not None:
            for index in tied:
                if index > self._last:
                    return index
        return tied[0]
