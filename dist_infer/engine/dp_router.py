"""Chooses the data-parallel replica for each new request (plain Python).

Least outstanding work first, but a request whose prompt starts with blocks a replica has recently served
goes to that replica (where they are likely still in its prefix cache), unless it is clearly busier than
the least loaded one.
"""

from __future__ import annotations

from collections import OrderedDict

from dist_infer.engine.kv_cache_manager import block_keys

_MAX_REMEMBERED = 100_000
_AFFINITY_SLACK = 1.5  # the cached replica may carry up to this much more work than the least loaded


class DataParallelRouter:
    def __init__(self, num_replicas: int, block_size: int):
        self.num_replicas, self.block_size = num_replicas, block_size
        self._prefix_owner: OrderedDict[bytes, int] = OrderedDict()  # block key (as the KV cache keys it) -> replica


    def route(self, token_ids: list[int], loads: list[int]) -> int:
        """``loads[i]``: outstanding tokens of replica i."""
        if self.num_replicas == 1:
            return 0
        chain = block_keys(token_ids, len(token_ids), self.block_size)
        least = min(range(self.num_replicas), key=lambda i: (loads[i], i))
        choice = least
        for key in reversed(chain):  # the longest prefix some replica has seen
            owner = self._prefix_owner.get(key)
            if owner is not None:
                if loads[owner] <= _AFFINITY_SLACK * loads[least] + len(token_ids):
                    choice = owner
                break
        for key in chain:
            self._prefix_owner[key] = choice
            self._prefix_owner.move_to_end(key)
        while len(self._prefix_owner) > _MAX_REMEMBERED:
            self._prefix_owner.popitem(last=False)
        return choice
