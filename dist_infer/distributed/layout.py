"""The rank layout, written down once (plain Python, so the driver and the executors use it without torch):
world = dp x pp x tp and

    rank = dp_rank * (pp * tp) + pp_rank * tp + tp_rank          (tp fastest)

so the ranks of one tensor-parallel group are consecutive and land on one node, the stages of one replica
follow each other, and replicas are contiguous blocks of pp * tp ranks. Example, dp=2, pp=2, tp=2:

    rank:     0  1  2  3  4  5  6  7
    dp_rank:  0  0  0  0  1  1  1  1
    pp_rank:  0  0  1  1  0  0  1  1
    tp_rank:  0  1  0  1  0  1  0  1

Expert parallelism spreads each stage's experts over its ``ep`` group: the tp x dp ranks of that stage that
share a torch world, in rank order (tp fastest), so ``ep_rank = dp_local * tp + tp_rank`` and ep rank ``q``
holds experts [q*E/ep, (q+1)*E/ep). Above, with one world for all ranks (torchrun) stage 0's ep group is
ranks 0 1 4 5 and stage 1's is 2 3 6 7 (ep = tp * dp = 4); with a world per replica (mp, Ray) each is that
replica's tp group (0 1 | 2 3 | 4 5 | 6 7; ep = tp = 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dist_infer.config import EngineConfig


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


def layout_of(config: EngineConfig) -> RankLayout:
    p = config.parallel_config
    return RankLayout(p.tensor_parallel_size, p.pipeline_parallel_size, p.data_parallel_size)
