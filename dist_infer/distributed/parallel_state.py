"""Named process groups (``tp``, ``pp``, ``dp``), built in this one place.

Rank layout, written down once: world = dp x pp x tp and

    rank = dp_rank * (pp * tp) + pp_rank * tp + tp_rank          (tp fastest)

so the ranks of one tensor-parallel group are consecutive and land on one node, the stages of one replica
follow each other, and replicas are contiguous blocks of pp * tp ranks. Example, dp=2, pp=2, tp=2:

    rank:     0  1  2  3  4  5  6  7
    dp_rank:  0  0  0  0  1  1  1  1
    pp_rank:  0  0  1  1  0  0  1  1
    tp_rank:  0  1  0  1  0  1  0  1

Every group has a device group (NCCL on CUDA, gloo on the CPU) for tensors and a gloo CPU group for control
messages. A process outside any distributed launch runs with trivial single-rank groups, so the parallel
layers behave as plain layers and their collectives cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch

from dist_infer.distributed.utils import pin_gloo_interface


@dataclass(frozen=True)
class RankLayout:
    tp: int
    pp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def replica_size(self) -> int:
        return self.tp * self.pp

    def rank(self, dp_rank: int, pp_rank: int, tp_rank: int) -> int:
        return dp_rank * self.pp * self.tp + pp_rank * self.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int, int]:
        """rank -> (dp_rank, pp_rank, tp_rank)."""
        return rank // (self.pp * self.tp), (rank // self.tp) % self.pp, rank % self.tp

    def tp_ranks(self, dp_rank: int, pp_rank: int) -> list[int]:
        return [self.rank(dp_rank, pp_rank, t) for t in range(self.tp)]

    def pp_ranks(self, dp_rank: int, tp_rank: int) -> list[int]:
        return [self.rank(dp_rank, p, tp_rank) for p in range(self.pp)]

    def dp_ranks(self, pp_rank: int, tp_rank: int) -> list[int]:
        return [self.rank(d, pp_rank, tp_rank) for d in range(self.dp)]

    def replica_ranks(self, dp_rank: int) -> list[int]:
        return list(range(dp_rank * self.replica_size, (dp_rank + 1) * self.replica_size))

    def output_rank(self, dp_rank: int) -> int:
        """The rank that samples for a replica: tensor-parallel rank 0 of its last stage."""
        return self.rank(dp_rank, self.pp - 1, 0)


@dataclass
class ParallelGroup:
    """One named group: its global ranks, this process's place in it, and its torch process groups."""

    name: str
    ranks: list[int] = field(default_factory=lambda: [0])
    rank_in_group: int = 0
    device_group: object | None = None
    cpu_group: object | None = None

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def is_first(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    @property
    def next_rank(self) -> int:
        return self.ranks[(self.rank_in_group + 1) % self.world_size]

    @property
    def prev_rank(self) -> int:
        return self.ranks[(self.rank_in_group - 1) % self.world_size]

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or ``op="max"``: elementwise maximum) of ``x`` over the group, in place; identity for one rank."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=self.device_group)
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
_LAYOUT: RankLayout | None = None


def get_group(name: str) -> ParallelGroup:
    group = _GROUPS.get(name)
    if group is None:
        group = _GROUPS[name] = ParallelGroup(name)
    return group


def get_tp_group() -> ParallelGroup:
    return get_group("tp")


def get_pp_group() -> ParallelGroup:
    return get_group("pp")


def get_dp_group() -> ParallelGroup:
    return get_group("dp")


def get_world_group() -> ParallelGroup:
    return get_group("world")


def get_layout() -> RankLayout | None:
    return _LAYOUT


def device_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(layout: RankLayout, rank: int, init_method: str, device: torch.device,
                     timeout_s: float = 600.0) -> None:
    """Joins the world and builds every named group. All ranks must call it (``new_group`` is collective).

    ``init_method`` is ``tcp://host:port`` (the same TCP store under Ray, local processes and torchrun) or
    ``env://`` (torchrun's MASTER_ADDR / MASTER_PORT).
    """
    import torch.distributed as dist

    global _LAYOUT
    backend = device_backend(device)
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        pin_gloo_interface(init_method)  # every layout has gloo groups (the CPU side groups at least)
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method=init_method, world_size=layout.world_size, rank=rank,
                                timeout=timeout, **kwargs)
    _LAYOUT = layout
    dp_rank, pp_rank, tp_rank = layout.coords(rank)
    world_cpu = dist.new_group(list(range(layout.world_size)), backend="gloo", timeout=timeout)
    _GROUPS["world"] = ParallelGroup("world", list(range(layout.world_size)), rank, dist.group.WORLD, world_cpu)
    families = {
        "tp": [layout.tp_ranks(d, p) for d in range(layout.dp) for p in range(layout.pp)],
        "pp": [layout.pp_ranks(d, t) for d in range(layout.dp) for t in range(layout.tp)],
        "dp": [layout.dp_ranks(p, t) for p in range(layout.pp) for t in range(layout.tp)],
    }
    for name, groups in families.items():
        for ranks in groups:
            # Every rank creates every group, in the same order, as new_group requires.
            device_group = dist.new_group(ranks, backend=backend, timeout=timeout)
            cpu_group = device_group if backend == "gloo" else dist.new_group(ranks, backend="gloo", timeout=timeout)
            if rank in ranks:
                _GROUPS[name] = ParallelGroup(name, ranks, ranks.index(rank), device_group, cpu_group)
    assert (get_tp_group().rank_in_group, get_pp_group().rank_in_group, get_dp_group().rank_in_group) == \
        (tp_rank, pp_rank, dp_rank)


def destroy_distributed() -> None:
    import torch.distributed as dist

    global _LAYOUT
    _GROUPS.clear()
    _LAYOUT = None
    if dist.is_initialized():
        dist.destroy_process_group()
