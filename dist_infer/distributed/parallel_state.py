"""Named process groups (``tp``, ``pp``, ``dp``) and their collectives.

A process outside any distributed launch runs with trivial single-rank groups, so the parallel layers
behave as plain layers and their collectives cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ParallelGroup:
    """One named group: its global ranks, this process's rank within it, and its torch process group."""

    name: str
    ranks: list[int] = field(default_factory=lambda: [0])
    rank_in_group: int = 0
    device_group: object | None = None

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the group, in place; identity for a single rank."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenation of every rank's ``x`` along ``dim``, in rank order."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=dim)


_GROUPS: dict[str, ParallelGroup] = {}


def get_group(name: str) -> ParallelGroup:
    group = _GROUPS.get(name)
    if group is None:
        group = _GROUPS[name] = ParallelGroup(name)
    return group


def get_tp_group() -> ParallelGroup:
    return get_group("tp")


def get_pp_group() -> ParallelGroup:
    return get_group("pp")
