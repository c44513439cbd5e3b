"""The serving simulator: the engine's own scheduler, KV-cache manager, engine cores and router, on simulated time.

Nothing here decides what runs: each data-parallel replica is a real ``EngineCore`` (its ``Scheduler`` and
``KVCacheManager`` unchanged, its pipeline micro-batching unchanged), requests are routed by the real
``DataParallelRouter``, and the loop below follows ``ReplicaManager.run_steps``: start steps on every replica with
room, wait for the first to come back, apply it. Only the executor is simulated (``SimulatedExecutor``): a step
does not run the model but is timed by a cost model, and its sampled tokens are made up (requests run with
``ignore_eos``, so their lengths are what the workload says).

Time of one step on one replica (every rank of a stage runs it together):

    dispatch  = when the engine thread, after its own per-step work (``engine_seconds``, one step after the other,
                on the host's cores beside the workers), hands it over
    stage 0   starts when stage 0 is free and the step was dispatched; computes ``stage_seconds(shape, 0)`` (on
              cores it may share), then waits ``stage_comm_seconds(shape, 0)`` in its collectives (longer
              while other threads compute: ``comm_stretch``)
    stage s   starts when stage s is free and stage s-1's activations arrived (``p2p_seconds`` after it ended)
    result    when the last stage ends; the engine applies it when its thread is free

Stages of one replica overlap on different micro-batches (up to ``max_batches_in_flight``), replicas run side by
side, and where the workers share a host's cores (CPU) the stages' work is time-sliced (``events.SharedHost``).
"""

from __future__ import annotations

import zlib
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

from dist_infer.config import EngineConfig
from dist_infer.engine.dp_router import DataParallelRouter
from dist_infer.engine.engine_core import EngineCore
from dist_infer.engine.messages import ModelRunnerOutput, SchedulerOutput
from dist_infer.engine.request import Request
from dist_infer.planner.events import EventQueue, SharedHost
from dist_infer.planner.metrics import RequestTimes, SimResult
from dist_infer.planner.step_shape import Layout, StepShape, step_shape
from dist_infer.planner.workload import Workload
from dist_infer.sampling_params import SamplingParams


@dataclass
class StepRecord:
    """One simulated step, for tests and plots: what ran, and when."""

    replica: int
    scheduled: SchedulerOutput
    shape: StepShape
    start: float
    end: float = 0.0


class SimulatedExecutor:
    """Stands in for the workers of every replica: keeps what workers would know of each request (diffs in, as
    the real workers get them) and times each step through the stages. ``execute_model`` returns a future that
    the event loop completes at the step's simulated end."""

    max_batches_in_flight = 1 << 30  # what the pipeline carries is the config's to say

    def __init__(self, events: EventQueue, host: SharedHost, cost, layout: Layout, vocab_size: int,
                 on_result, on_engine_idle, records: list[StepRecord] | None):
        self.events, self.host, self.cost, self.layout = events, host, cost, layout
        self.vocab_size, self.on_result, self.on_engine_idle, self.records = vocab_size, on_result, on_engine_idle, \
            records
        self.num_tokens: dict[str, int] = {}
        # Per replica and stage: steps waiting for the stage, and whether it is busy.
        self.queues = [[deque() for _ in range(layout.pp)] for _ in range(layout.dp)]
        self.busy = [[False] * layout.pp for _ in range(layout.dp)]
        # The engine thread's own work for each step it hands over (``engine_seconds``), one after the other, on
        # the host's cores like any other thread.
        self.engine_queue: deque = deque()
        self.engine_busy = False

    def execute_model(self, scheduled: SchedulerOutput, replica: int = 0) -> Future:
        for req_id in scheduled.finished_req_ids:
            self.num_tokens.pop(req_id, None)
        for new in scheduled.new_requests:
            self.num_tokens[new.req_id] = len(new.token_ids)
        for cached in scheduled.cached_requests:
            self.num_tokens[cached.req_id] += len(cached.new_token_ids)
        shape = step_shape(scheduled, self.num_tokens)
        future: Future = Future()
        record = StepRecord(replica, scheduled, shape, self.events.now)
        if self.records is not None:
            self.records.append(record)
        self.engine_queue.append((replica, (scheduled, shape, future, record)))
        self._engine_next()
        return future

    def _engine_next(self) -> None:
        if self.engine_busy:
            return
        if not self.engine_queue:
            self.on_engine_idle()
            return
        replica, step = self.engine_queue.popleft()
        self.engine_busy = True

        def handed_over():
            self.engine_busy = False
            step[3].start = self.events.now
            self._enter(replica, 0, step)
            self._engine_next()

        self.host.run(self.cost.engine_seconds(step[1], self.layout), handed_over)

    def _enter(self, replica: int, stage: int, step) -> None:
        self.queues[replica][stage].append(step)
        self._next(replica, stage)

    def _next(self, replica: int, stage: int) -> None:
        if self.busy[replica][stage] or not self.queues[replica][stage]:
            return
        step = self.queues[replica][stage].popleft()
        self.busy[replica][stage] = True
        shape = step[1]
        work = self.cost.stage_seconds(shape, self.layout, stage)
        comm = self.cost.stage_comm_seconds(shape, self.layout, stage)
        done = lambda: self._stage_done(replica, stage, step)  # noqa: E731
        demand, threads, efficiency = self.cost.stage_load(shape, self.layout)
        # A rank waiting in a collective takes no core, so collectives are time, not work; but they take longer the
        # more threads compute beside them when they start.
        def communicate():
            self.events.at(self.events.now + comm * self.cost.comm_stretch(self.layout, self.host.demand()), done)

        self.host.run(work, communicate if comm else done, demand, threads, efficiency)

    def _stage_done(self, replica: int, stage: int, step) -> None:
        self.busy[replica][stage] = False
        self._next(replica, stage)
        if stage + 1 < self.layout.pp:
            delay = self.cost.p2p_seconds(step[1], self.layout)
            self.events.at(self.events.now + delay, lambda: self._enter(replica, stage + 1, step))
            return
        scheduled, shape, future, record = step
        record.end = self.events.now
        future.set_result(self._sample(scheduled, shape))
        self.on_result()

    def _sample(self, scheduled: SchedulerOutput, shape: StepShape) -> ModelRunnerOutput:
        """A made-up token for every row that reached the end of its sequence (its id only feeds the prefix
        cache's keys of generated blocks). ``shape.queries`` follows ``num_scheduled_tokens``' order."""
        out = ModelRunnerOutput()
        for req_id, (n, context) in zip(scheduled.num_scheduled_tokens, shape.queries):
            if context + n >= self.num_tokens[req_id]:
                # A stable digest, not hash(): str hashes change from one process to the next.
                digest = zlib.crc32(f"{req_id}:{context + n}".encode())
                out.sampled_token_ids[req_id] = 1 + digest % (self.vocab_size - 1)
        return out


@dataclass
class _Loop:
    """The engine thread's loop: whether an iteration is queued, and whether one is owed once the thread has handed
    over the steps it started (results that came back meanwhile wait for it, as in the real loop)."""

    queued: bool = False
    owed: bool = False


def simulate(config: EngineConfig, num_blocks: list[int], cost, workload: Workload,
             records: list[StepRecord] | None = None) -> SimResult:
    """Runs ``workload`` through the engine of ``config`` with ``num_blocks`` usable KV blocks per replica (per
    KV-cache group), timed by ``cost``; returns every request's times. ``records`` collects the steps."""
    parallel = config.parallel_config
    layout = Layout(parallel.tensor_parallel_size, parallel.pipeline_parallel_size, parallel.data_parallel_size,
                    tuple(end - start for start, end in parallel.layer_ranges(config.model_config.num_layers)))
    events = EventQueue()
    host = SharedHost(events, cost.host_cores)
    loop = _Loop()
    executor = SimulatedExecutor(events, host, cost, layout, config.model_config.vocab_size,
                                 lambda: wake(), lambda: loop.owed and wake(), records)
    cores = [EngineCore(config, num_blocks, d, executor) for d in range(layout.dp)]
    router = DataParallelRouter(config.cache_config.block_size)
    times: dict[str, RequestTimes] = {}
    arrivals = deque((str(i), item) for i, item in enumerate(workload.items))

    def wake(when: float | None = None) -> None:
        """Runs an iteration at ``when`` (default now), or as soon as the engine thread is free."""
        if executor.engine_busy or executor.engine_queue:
            loop.owed = True
        elif not loop.queued:
            loop.queued, loop.owed = True, False
            events.at(events.now if when is None else when, iterate)

    def place_arrivals(now: float) -> None:
        while arrivals and arrivals[0][1].arrival_s <= now:
            req_id, item = arrivals.popleft()
            params = SamplingParams(max_tokens=item.output_len, ignore_eos=True, temperature=0.0)
            request = Request(req_id, list(item.prompt_token_ids), params, frozenset(), item.output_len,
                              arrival_time=item.arrival_s)
            times[req_id] = RequestTimes(item.arrival_s, item.prompt_len, item.output_len)
            loads = {d: core.scheduler.outstanding_work() for d, core in enumerate(cores)}
            cores[router.route(request.token_ids, loads)].scheduler.add_request(request)

    def iterate() -> None:
        loop.queued = False
        t = events.now
        # Each replica whose oldest step came back applies it (one per replica, as ReplicaManager.run_steps does).
        for core in cores:
            if core.oldest is not None and core.oldest.done():
                for output in core.finish_oldest():
                    entry = times[output.req_id]
                    if output.new_token_ids:
                        if entry.first_token is None:
                            entry.first_token = t
                            entry.cached_tokens = output.num_cached_tokens
                        entry.generated += len(output.new_token_ids)
                    if output.finish_reason is not None:
                        entry.finish = t
        place_arrivals(t)
        for core in cores:
            core.fill_pipeline()
        if any(core.oldest is not None and core.oldest.done() for core in cores):
            wake()  # more results are waiting
        elif arrivals and all(core.oldest is None for core in cores):
            wake(arrivals[0][1].arrival_s)  # idle: the next request wakes the engine

    wake(workload.items[0].arrival_s)
    events.run()
    unfinished = [r for r in times.values() if r.finish is None]
    if unfinished or arrivals:
        raise RuntimeError(f"the simulation stopped with {len(unfinished) + len(arrivals)} requests unfinished")
    stats = [core.scheduler.get_stats() for core in cores]
    return SimResult(str(layout), list(times.values()), num_steps=sum(s.num_steps for s in stats),
                     num_preemptions=sum(s.num_preemptions for s in stats),
                     prefix_cache_hits=sum(s.prefix_cache_hits for s in stats))
