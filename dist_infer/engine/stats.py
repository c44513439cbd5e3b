"""Engine statistics as plain numbers, for logs, metrics endpoints and benchmarks (plain Python)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Timestamps (``time.monotonic()``) of one request as its caller sees it, and the gaps between tokens."""

    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    inter_token_latencies: list[float] = field(default_factory=list)

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    def record_tokens(self, now: float | None = None) -> None:
        """One step's new tokens arrived at ``now``."""
        now = time.monotonic() if now is None else now
        if self.first_token_time is None:
            self.first_token_time = now
        else:
            self.inter_token_latencies.append(now - self.last_token_time)
        self.last_token_time = now


@dataclass
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    # Per KV-cache group (``kv_cache_groups``: full attention first, then each sliding window); the two above
    # are their sums.
    kv_group_blocks_total: tuple[int, ...] = ()
    kv_group_blocks_free: tuple[int, ...] = ()
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, found there
    num_preemptions: int = 0  # since start
    requests_added: int = 0  # since start
    num_steps: int = 0
    last_step_tokens: int = 0  # tokens computed by the latest step
    prompt_tokens_computed: int = 0  # since start; prefix-cache hits are not computed
    generation_tokens: int = 0  # since start

    @property
    def kv_blocks_used(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_free

    @property
    def kv_group_blocks_used(self) -> tuple[int, ...]:
        return tuple(t - f for t, f in zip(self.kv_group_blocks_total, self.kv_group_blocks_free))

    def add(self, other: SchedulerStats) -> None:
        """Adds ``other``'s numbers to these (replicas summed); per-group tuples add group by group."""
        for name, value in vars(other).items():
            mine = getattr(self, name)
            if isinstance(value, tuple):
                value = tuple(a + b for a, b in zip(mine, value)) if mine else value
            else:
                value = mine + value
            setattr(self, name, value)

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def mean_tokens_per_step(self) -> float:
        return (self.prompt_tokens_computed + self.generation_tokens) / self.num_steps if self.num_steps else 0.0
