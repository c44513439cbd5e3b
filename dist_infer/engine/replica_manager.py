"""The engine's data-parallel replicas as failure domains: routing, failure, migration, rebuild and scaling.

- **Routing.** A new request goes to a SERVING replica chosen by the router (least outstanding work, prefix
  affinity, ties spread), passing over one whose oldest step has run a tenth of the step timeout while
  another has none so old. With none serving it waits, as an orphan, for up to ``no_replica_timeout_s``.
- **Failure.** A replica fails when a step of it raises (a worker raised or died), when its oldest step in
  flight is older than ``worker_timeout_s`` (a hung worker is found while other replicas keep finishing
  steps), or when a health check of its idle workers fails or goes unanswered (``engine.health``). Its
  requests, in flight and queued, move to healthy replicas with every token produced so far
  (``Request.reset_for_migration``): the new replica recomputes prompt + output and samples on from there;
  seeded sampling depends only on (seed, position), so the output is what an undisturbed run gives. A
  request that moved more than ``migration_limit`` times, or found no replica for ``no_replica_timeout_s``,
  ends with an error. The failed replica is torn down and rebuilt in the background.
- **Scaling.** ``set_target`` (the autoscaler, or an operator) sets how many replicas should run; new
  ones are built in the background, surplus ones drain: they leave the router, finish what they hold (after
  ``drain_timeout_s`` they move the rest) and stop.

Engines whose replicas share one launch (``uni``, ``torchrun``) or one world (experts spread over the
replicas) cannot lose one replica alone: there a step failure is raised to the caller and ends the engine.
Replicas that share a world step in lockstep: whenever one runs a step every other runs one too, empty if
it has nothing to do, so that the collectives inside the model find every worker.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, wait

from dist_infer.config import EngineConfig
from dist_infer.engine.autoscaling import AutoscalingPolicy
from dist_infer.engine.dp_router import DataParallelRouter
from dist_infer.engine.engine_core import EngineCore
from dist_infer.engine.health import HealthChecker
from dist_infer.engine.messages import EngineCoreOutput
from dist_infer.engine.replica import Replica, ReplicaState
from dist_infer.engine.replica_supervisor import ReplicaSupervisor
from dist_infer.engine.request import Request, RequestStatus
from dist_infer.executor.factory import ExecutorGroup

logger = logging.getLogger("dist_infer.replicas")

_IDLE_WAIT_S = 0.05  # how long a step waits for a rebuild when no replica can run anything


class EngineUnavailableError(RuntimeError):
    """No replica can serve, and none will again (every one failed and could not be rebuilt)."""


class ReplicaManager:
    def __init__(self, config: EngineConfig, executors: ExecutorGroup, num_blocks: list[int], on_change=None):
        self.config, self.executors, self.num_blocks = config, executors, num_blocks
        rc = config.replica_config
        self.replica_config = rc
        self.step_timeout_s = config.parallel_config.worker_timeout_s
        self.suspect_after_s = max(1.0, self.step_timeout_s / 10)
        self.replicas: dict[int, Replica] = {}
        for d in range(config.parallel_config.data_parallel_size):
            self.replicas[d] = Replica(d, ReplicaState.SERVING, EngineCore(config, num_blocks, d, executors))
        self.target = len(self.replicas)
        self.router = DataParallelRouter(config.cache_config.block_size)
        self.supervisor = ReplicaSupervisor(executors, num_blocks, rc.max_replica_restarts,
                                            rc.replica_restart_backoff_s, on_change)
        self.health = HealthChecker(executors, rc.health_check_period_s, self.step_timeout_s,
                                    on_change or (lambda: None))
        self.policy = AutoscalingPolicy(rc.autoscaling) if rc.autoscaling.enabled else None
        self.orphans: OrderedDict[str, tuple[Request, float]] = OrderedDict()  # waiting for any replica
        self.failed_requests: list[tuple[str, str]] = []  # (request id, why) to end with an error
        self.dead: EngineUnavailableError | None = None
        self.owner: dict[str, Replica] = {}

    # ---- requests --------------------------------------------------------------------------------------
    @property
    def isolated(self) -> bool:
        return self.executors.isolated

    def serving(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.state == ReplicaState.SERVING]

    def cores(self) -> list[EngineCore]:
        # A snapshot: other threads read it (queue lengths) while the engine thread may add replicas.
        return [r.core for r in list(self.replicas.values()) if r.core is not None and r.steps]

    def place(self, request: Request, replica: int | None = None) -> None:
        """Queues ``request`` on a serving replica (``replica``: that one), or as an orphan until one serves."""
        if replica is not None:
            target = self.replicas.get(replica)
            if target is None or target.state != ReplicaState.SERVING:
                raise ValueError(f"replica {replica} is not serving")
        else:
            target = self._route(request)
        if target is None:
            self.orphans[request.request_id] = (request, time.monotonic())
            return
        target.core.scheduler.add_request(request)
        self.owner[request.request_id] = target

    def _route(self, request: Request) -> Replica | None:
        serving = self.serving()
        if not serving:
            return None
        # A replica whose oldest step has run far longer than steps do may be hanging: new requests go to the
        # others while any looks healthy (it fails, and its requests move, once the step timeout passes).
        now = time.monotonic()
        responsive = [r for r in serving if r.core.oldest_started is None
                      or now - r.core.oldest_started < self.suspect_after_s]
        loads = {r.index: r.core.scheduler.outstanding_work() for r in responsive or serving}
        return self.replicas[self.router.route(request.token_ids, loads)]

    def finish(self, request_id: str, status: RequestStatus) -> None:
        replica = self.owner.pop(request_id, None)
        if replica is not None and replica.core is not None:
            replica.core.scheduler.finish_requests([request_id], status)
        self.orphans.pop(request_id, None)

    def is_known(self, request_id: str) -> bool:
        return request_id in self.owner or request_id in self.orphans or any(
            c.scheduler.is_in_flight(request_id) for c in self.cores())

    def num_unfinished(self) -> int:
        return sum(c.scheduler.num_unfinished for c in self.cores()) + len(self.orphans)

    def has_work(self) -> bool:
        return bool(self.orphans) or any(c.scheduler.num_unfinished or c.in_flight for c in self.cores())

    # ---- one step --------------------------------------------------------------------------------------
    def run_steps(self) -> list[EngineCoreOutput]:
        """Applies finished rebuilds and scaling, starts steps on every replica that runs, waits (bounded by
        each replica's step timeout) for the first to return; fails the replicas that raised or hung."""
        self._apply_builds()
        self._check_health()
        self._autoscale()
        self._place_orphans()
        self._expire_orphans()
        self._progress_drains()
        if self.executors.lockstep:
            self._fill_in_lockstep([r.core for r in self.replicas.values() if r.steps])
        for replica in self.replicas.values():
            if replica.steps and not self.executors.lockstep:
                try:
                    replica.core.fill_pipeline()
                except Exception as e:  # the executor refused the step (its workers are gone)
                    self._fail(replica, e)
        outputs = []
        for replica in self._wait_for_results():
            try:
                outputs += replica.core.finish_oldest()
            except Exception as e:
                self._fail(replica, e)
        for output in outputs:
            if output.finish_reason is not None:
                self.owner.pop(output.req_id, None)
        return outputs

    @staticmethod
    def _fill_in_lockstep(cores: list[EngineCore]) -> None:
        """Starts steps on every replica at once while each has room and any has work; the ones without work
        run an empty step. Each worker runs its calls in order, so the k-th step of every replica meets the
        k-th of the others in the model's collectives."""
        while cores and all(core.has_room for core in cores):
            batches = [core.schedule_next() for core in cores]
            if not any(batch.num_scheduled_tokens for batch in batches):
                return
            for core, batch in zip(cores, batches):
                core.start(batch)

    def _wait_for_results(self) -> list[Replica]:
        busy = [r for r in self.replicas.values() if r.steps and r.core.oldest is not None]
        if not busy:
            if self.orphans:  # nothing can run until a replica is back
                self.supervisor.changed.wait(_IDLE_WAIT_S)
            return []
        now = time.monotonic()
        deadline = min(r.core.oldest_started for r in busy) + self.step_timeout_s
        done, _ = wait([r.core.oldest for r in busy], timeout=max(0.0, deadline - now), return_when=FIRST_COMPLETED)
        ready = [r for r in busy if r.core.oldest in done]
        now = time.monotonic()
        for replica in busy:
            if replica not in ready and now - replica.core.oldest_started >= self.step_timeout_s:
                pending = sorted(getattr(replica.core.oldest, "pending_ranks", lambda: [])())
                self._fail(replica, TimeoutError(
                    f"replica {replica.index}: no step finished within {self.step_timeout_s:.0f}s; waiting on worker "
                    f"rank(s) {pending}"))
        return ready

    # ---- failure and migration -------------------------------------------------------------------------
    def probe(self, index: int) -> list[Future]:
        """Starts a health check of serving replica ``index`` now; its pings' futures, to wait for off the
        engine thread (a failed or silent one fails the replica on a later step, as any health check does)."""
        replica = self.replicas.get(index)
        if replica is None or replica.state != ReplicaState.SERVING:
            return []
        return self.health.probe(replica)

    def _check_health(self) -> None:
        if not self.isolated:  # one launch for every replica: a dead worker shows in the next step
            return
        for replica, error in self.health.tick(list(self.replicas.values()), time.monotonic(), periodic=True):
            self._fail(replica, error)

    def _fail(self, replica: Replica, error: BaseException) -> None:
        if not self.isolated:
            raise error  # one launch for every replica: the engine cannot go on without this one
        if replica.state in (ReplicaState.FAILED, ReplicaState.STOPPED):
            return
        # Replicas in lockstep share one world: they fail together and come back with one rebuild.
        group = [replica]
        if self.executors.lockstep:
            group += [r for r in self.replicas.values() if r is not replica
                      and r.state not in (ReplicaState.FAILED, ReplicaState.STOPPED)]
        leaving = replica.state == ReplicaState.DRAINING or replica.stop_when_built  # scaled down: not rebuilt
        moved = []
        for member in group:
            member.events.failures += 1
            member.events.last_error = str(error) if member is replica else (
                f"it shares a world with replica {replica.index}, which failed: {error}")
            logger.error("replica %d failed: %s", member.index, member.events.last_error)
            moved.append((member, member.core.scheduler.take_all()))
            member.core = None
            self.router.forget_replica(member.index)
            member.set_state(ReplicaState.FAILED)
        if leaving or self.replica_config.max_replica_restarts == 0:
            for member in group:
                self._give_up(member, member.events.last_error)
        else:
            self.supervisor.rebuild(replica.index)
        for member, requests in moved:
            self._migrate(member, requests)

    def _migrate(self, source: Replica, requests: list[Request], failure: bool = True) -> None:
        """Moves ``requests`` off ``source``; a move after a failure counts against ``migration_limit``, the
        end of a drain does not."""
        limit = self.replica_config.migration_limit
        for request in requests:
            self.owner.pop(request.request_id, None)
            if failure and request.num_migrations >= limit:
                self.failed_requests.append((request.request_id, (
                    f"request {request.request_id} moved {request.num_migrations} times after replica failures "
                    f"(migration_limit={limit}); last: replica {source.index} failed: {source.events.last_error}")))
                continue
            request.reset_for_migration(counted=failure)
            source.events.migrations += 1
            self.place(request)

    def _place_orphans(self) -> None:
        if not self.orphans or not self.serving():
            return
        waiting, self.orphans = self.orphans, OrderedDict()
        for request, since in waiting.values():
            self.place(request)
            if request.request_id in self.orphans:  # still no replica (cannot happen while one serves)
                self.orphans[request.request_id] = (request, since)

    def _expire_orphans(self) -> None:
        bound = self.replica_config.no_replica_timeout_s
        now = time.monotonic()
        for request_id, (request, since) in list(self.orphans.items()):
            if self.dead is not None or now - since >= bound:
                del self.orphans[request_id]
                why = str(self.dead) if self.dead is not None else (
                    f"no replica could serve request {request_id} for {bound:.0f}s (no_replica_timeout_s); "
                    f"replicas: {self.describe()}")
                self.failed_requests.append((request_id, why))

    def _give_up(self, replica: Replica, why: str) -> None:
        replica.set_state(ReplicaState.STOPPED)
        self.supervisor.stop(replica.index, graceful=False)
        alive = [r for r in self.replicas.values() if r.state != ReplicaState.STOPPED]
        if not alive and self.dead is None:
            self.dead = EngineUnavailableError(
                f"every replica has failed and none could be rebuilt; last error: replica {replica.index}: {why}")
            logger.error("%s", self.dead)
            self._expire_orphans()

    def _apply_builds(self) -> None:
        for result in self.supervisor.take_results():
            built = self.replicas[result.replica]
            # In lockstep one build brings back every failed replica of the shared world.
            group = [built] + ([r for r in self.replicas.values() if r is not built and r.state == ReplicaState.FAILED]
                               if self.executors.lockstep else [])
            for replica in group:
                self._apply_build(replica, result)

    def _apply_build(self, replica: Replica, result) -> None:
        replica.events.rebuild_failures += result.failed_attempts
        if result.executor is None:
            logger.error("replica %d: giving up after %d failed build(s): %s", replica.index,
                         result.failed_attempts, result.error)
            self._give_up(replica, result.error)
            return
        if replica.stop_when_built:
            replica.set_state(ReplicaState.STOPPED)
            self.supervisor.stop(replica.index)
            return
        rebuilt = replica.state == ReplicaState.FAILED
        replica.core = EngineCore(self.config, self.num_blocks, replica.index, self.executors)
        replica.set_state(ReplicaState.SERVING)
        if rebuilt:
            replica.events.rebuilds += 1
        replica.events.rebuild_seconds.append(result.seconds)
        logger.warning("replica %d %s in %.1fs", replica.index, "rebuilt" if rebuilt else "started",
                       result.seconds)

    # ---- scaling -----------------------------------------------------------------------------------------
    def set_target(self, count: int) -> None:
        """Runs ``count`` replicas: builds new ones, or drains the surplus (newest first)."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"the replica count must be an int >= 1, got {count!r}")
        if not self.isolated and count != self.target:
            raise ValueError("replicas can be added and removed only with the 'mp' or 'ray' backend")
        if self.executors.lockstep and count != self.target:
            raise ValueError("replicas whose experts are spread over each other's workers share one world: they "
                             "cannot be added or removed one by one")
        self.target = count
        active = [r for r in self.replicas.values()
                  if r.state in (ReplicaState.STARTING, ReplicaState.SERVING, ReplicaState.FAILED)
                  and not r.stop_when_built]
        for replica in sorted(active, key=lambda r: -r.index)[:max(0, len(active) - count)]:
            self._start_drain(replica)
        for _ in range(count - len(active)):
            # A new index each time: a stopped replica's workers may still be being torn down under its own.
            index = max(self.replicas, default=-1) + 1
            self.replicas[index] = Replica(index)
            self.supervisor.add(index)

    def _start_drain(self, replica: Replica) -> None:
        if replica.state == ReplicaState.SERVING:
            replica.set_state(ReplicaState.DRAINING)
            replica.drain_deadline = time.monotonic() + self.replica_config.drain_timeout_s
            self.router.forget_replica(replica.index)
            logger.warning("replica %d draining", replica.index)
        else:  # still being built or rebuilt: stop it once that is done
            replica.stop_when_built = True

    def _progress_drains(self) -> None:
        now = time.monotonic()
        for replica in self.replicas.values():
            if replica.state != ReplicaState.DRAINING:
                continue
            if replica.core.idle:
                replica.core = None
                replica.set_state(ReplicaState.STOPPED)
                self.supervisor.stop(replica.index)
                logger.warning("replica %d drained and stopped", replica.index)
            elif now >= replica.drain_deadline and self.serving():
                self._migrate(replica, replica.core.scheduler.take_all(), failure=False)

    def _autoscale(self) -> None:
        if self.policy is None:
            return
        running = len([r for r in self.replicas.values()
                       if r.state != ReplicaState.STOPPED and r.state != ReplicaState.DRAINING
                       and not r.stop_when_built])
        wanted = self.policy.decide(time.monotonic(), running, self.num_unfinished())
        if wanted != self.target:
            logger.warning("autoscaling: %d -> %d replicas (%d requests ongoing)", self.target, wanted,
                           self.num_unfinished())
            self.set_target(wanted)

    # ---- reporting ---------------------------------------------------------------------------------------
    def describe(self) -> str:
        return ", ".join(f"{r.index}: {r.state.value}" for r in self.replicas.values()) or "none"

    def states(self) -> dict[int, str]:
        return {r.index: r.state.value for r in list(self.replicas.values())}

    def close(self) -> None:
        self.supervisor.close()
