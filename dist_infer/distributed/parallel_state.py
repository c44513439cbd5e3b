"""Named process groups (``tp``, ``pp``, ``dp``, ``ep``), built in this one place.

Which rank holds which (dp, pp, tp) place is ``layout.RankLayout``'s to say.

Every group has a device group (NCCL on CUDA, gloo on the CPU) for tensors and a gloo CPU group for control
messages. A process outside any distributed launch runs with trivial single-rank groups, so the parallel
layers behave as plain layers and their collectives cost nothing.

``ep`` (expert parallel) holds the tp x dp ranks of one pipeline stage that share a torch world, in rank order
(tp fastest), so its rank is ``dp_local * tp + tp_rank``. Under the mp and Ray executors each replica has a
world of its own and ``ep`` is the tp group's ranks; under torchrun it spans the replicas.

Each group counts the bytes its collectives hand in (``bytes_moved``: the input tensor's bytes per call on this
rank, whatever the algorithm does on the wire), so a benchmark can compare communication volumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch

from dist_infer.distributed.layout import RankLayout
from dist_infer.distributed.utils import pin_gloo_interface


@dataclass
class ParallelGroup:
    """One named group: its global ranks, this process's place in it, and its torch process groups."""

    name: str
    ranks: list[int] = field(default_factory=lambda: [0])
    rank_in_group: int = 0
    device_group: object | None = None
    cpu_group: object | None = None
    bytes_moved: int = 0

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

        self.bytes_moved += x.numel() * x.element_size()
        dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenation of every rank's ``x`` along ``dim``, in rank order."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        self.bytes_moved += x.numel() * x.element_size()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """[world_size * n, ...] -> [n, ...]: rank ``r`` gets the sum over ranks of rows [r*n, (r+1)*n)."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        self.bytes_moved += x.numel() * x.element_size()
        out = torch.empty((x.shape[0] // self.world_size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x.contiguous(), group=self.device_group)
        return out


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


def get_dp_group() -> ParallelGroup:
    return get_group("dp")


def get_ep_group() -> ParallelGroup:
    return get_group("ep")


def collective_bytes() -> dict[str, int]:
    """Bytes each named group's collectives have handed in on this rank so far."""
    return {name: group.bytes_moved for name, group in _GROUPS.items()}


def get_world_group() -> ParallelGroup:
    return get_group("world")


def device_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(layout: RankLayout, rank: int, init_method: str, device: torch.device,
                     timeout_s: float = 600.0, world_ranks: list[int] | None = None) -> None:
    """Joins the world and builds every named group. All ranks of the world must call it (``new_group`` is
    collective).

    ``world_ranks``: the (global) ranks that share this torch world, by default all of them (torchrun). The
    local and Ray executors give each data-parallel replica a world of its own (its tp x pp ranks), so a
    replica whose worker dies is rebuilt with a new world while the others run on untouched; their dp groups
    are then this rank alone (dense replicas never talk to each other). Within a world, torch numbers the
    ranks by their place in ``world_ranks``; every group's ``ranks`` are those torch ranks.

    ``init_method`` is ``tcp://host:port`` (the same TCP store under Ray, local processes and torchrun) or
    ``env://`` (torchrun's MASTER_ADDR / MASTER_PORT).
    """
    import torch.distributed as dist

    members = list(range(layout.world_size)) if world_ranks is None else list(world_ranks)
    local = {g: i for i, g in enumerate(members)}  # global rank -> torch rank in this world
    backend = device_backend(device)
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        pin_gloo_interface(init_method)  # every layout has gloo groups (the CPU side groups at least)
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method=init_method, world_size=len(members), rank=local[rank],
                                timeout=timeout, **kwargs)
    dp_rank, pp_rank, tp_rank = layout.coords(rank)
    world_cpu = dist.new_group(list(range(len(members))), backend="gloo", timeout=timeout)
    _GROUPS["world"] = ParallelGroup("world", list(range(len(members))), local[rank], dist.group.WORLD, world_cpu)
    replicas = sorted({layout.coords(r)[0] for r in members})
    families = {
        "tp": [layout.tp_ranks(d, p) for d in replicas for p in range(layout.pp)],
        "pp": [layout.pp_ranks(d, t) for d in replicas for t in range(layout.tp)],
        "dp": [[r for r in members if layout.coords(r)[1:] == (p, t)] for p in range(layout.pp) for t in range(layout.tp)],
        "ep": [[r for r in members if layout.coords(r)[1] == p] for p in range(layout.pp)],
    }
    for name, groups in families.items():
        for ranks in groups:
            ranks = [local[r] for r in ranks]
            # Every rank creates every group, in the same order, as new_group requires.
            device_group = dist.new_group(ranks, backend=backend, timeout=timeout)
            cpu_group = device_group if backend == "gloo" else dist.new_group(ranks, backend="gloo", timeout=timeout)
            if local[rank] in ranks:
                _GROUPS[name] = ParallelGroup(name, ranks, ranks.index(local[rank]), device_group, cpu_group)
    assert (get_tp_group().rank_in_group, get_pp_group().rank_in_group) == (tp_rank, pp_rank)
    assert get_dp_group().rank_in_group == replicas.index(dp_rank)


def destroy_distributed() -> None:
    import torch.distributed as dist

    _GROUPS.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
