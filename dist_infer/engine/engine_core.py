"""One data-parallel replica's engine core: its scheduler, its KV cache, and its steps in flight.

With pipeline parallelism the core keeps up to ``max_batches_in_flight`` (default: the number of stages)
steps in flight, each over requests the others do not hold, so every stage has work: while stage 1 runs
step k, stage 0 runs step k+1.

Replicas that step in lockstep (their workers meet inside the model: experts spread over replicas) also send
empty steps: a replica with nothing to run still runs the model on no tokens, so that its workers join the
others' collectives (``ReplicaManager``).
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future

from dist_infer.config import EngineConfig
from dist_infer.engine.kv_cache_manager import KVCacheManager
from dist_infer.engine.messages import EngineCoreOutput, SchedulerOutput
from dist_infer.engine.scheduler import Scheduler
from dist_infer.executor.base import Executor
from dist_infer.kv_cache_groups import KVCacheGroups


class EngineCore:
    def __init__(self, config: EngineConfig, num_blocks: list[int], replica: int, executor: Executor):
        """``num_blocks``: usable KV blocks per KV-cache group (``kv_cache_groups``)."""
        self.replica, self.executor = replica, executor
        self.kv_cache_manager = KVCacheManager(num_blocks, config.cache_config.block_size,
                                               config.cache_config.enable_prefix_caching,
                                               KVCacheGroups.from_hf_config(config.model_config.hf_config))
        self.scheduler = Scheduler(config.scheduler_config, self.kv_cache_manager, config.model_config.max_model_len)
        self.in_flight: deque[tuple[SchedulerOutput, Future]] = deque()
        self._started: deque[float] = deque()  # when each step in flight was handed to the workers
        # What the executor can carry, capped by the setting.
        self.max_batches_in_flight = min(executor.max_batches_in_flight, config.parallel_config.max_batches_in_flight)

    def fill_pipeline(self) -> None:
        """Schedules and starts steps until the pipeline is full or nothing more can run."""
        while self.has_room:
            scheduled = self.schedule_next()
            if not scheduled.num_scheduled_tokens:
                return
            self.start(scheduled)

    @property
    def has_room(self) -> bool:
        return len(self.in_flight) < self.max_batches_in_flight

    def schedule_next(self) -> SchedulerOutput:
        """The next step's batch (possibly empty). With several steps in flight, each takes at most its share
        of the requests, so that the steps that follow have requests of their own and every stage stays busy."""
        cap = None
        if self.max_batches_in_flight > 1:
            active = min(self.scheduler.num_unfinished, self.scheduler.config.max_num_seqs)
            cap = max(1, -(-active // self.max_batches_in_flight))
        return self.scheduler.schedule(cap)

    def start(self, scheduled: SchedulerOutput) -> None:
        """Hands a step to the workers; an empty one only runs the model on no tokens (lockstep)."""
        self.in_flight.append((scheduled, self.executor.execute_model(scheduled, self.replica)))
        self._started.append(time.monotonic())

    @property
    def oldest(self) -> Future | None:
        return self.in_flight[0][1] if self.in_flight else None

    @property
    def oldest_started(self) -> float | None:
        """When the oldest step in flight started (its age is how long this replica has been silent)."""
        return self._started[0] if self._started else None

    def finish_oldest(self) -> list[EngineCoreOutput]:
        """Applies the oldest step's result (it must be done); raises the worker's error if it failed."""
        scheduled, future = self.in_flight.popleft()
        self._started.popleft()
        result = future.result()
        if not scheduled.num_scheduled_tokens:  # a lockstep filler: nothing to apply
            return []
        return self.scheduler.update_from_output(scheduled, result)

    @property
    def idle(self) -> bool:
        return not self.in_flight and not self.scheduler.num_unfinished
