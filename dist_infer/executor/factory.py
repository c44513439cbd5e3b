"""The executors of an engine, one per data-parallel replica where the backend allows it.

``mp`` and ``ray`` give every replica workers and a torch world of its own: a replica is the unit that fails,
is torn down and is rebuilt, and replicas can be added and removed while the others run. ``uni`` (one worker)
and ``torchrun`` (one SPMD launch, whose failure ends the job) have one executor for every replica.
``ExecutorGroup`` offers the engine the executor interface over all of them, by global rank.

Replicas whose experts are spread over each other's workers (expert parallelism with ``data_parallel_size``
> 1) exchange tokens in every MoE layer, so they share one torch world and one executor (registered under
every replica's index), fail and are rebuilt together, and step in lockstep (``ExecutorGroup.lockstep``).
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import Future

from dist_infer.config import EngineConfig
from dist_infer.engine.messages import ModelRunnerOutput, SchedulerOutput
from dist_infer.executor.base import Executor, Method


def create_executor(config: EngineConfig, replica: int | None = 0,
                    workers_per_node: Counter | None = None) -> Executor:
    """The executor for the config's backend: for ``mp`` and ``ray`` the workers of ``replica`` alone
    (``None``: of every replica, in one world), otherwise every worker."""
    backend = config.parallel_config.distributed_executor_backend
    if backend == "uni":
        from dist_infer.executor.uniproc import UniProcExecutor

        return UniProcExecutor(config)
    if backend == "mp":
        from dist_infer.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config, replica, planned_workers(config))
    if backend == "ray":
        from dist_infer.executor.ray_executor import RayExecutor

        return RayExecutor(config, replica, workers_per_node)
    from dist_infer.executor.torchrun import TorchrunExecutor

    return TorchrunExecutor(config)


def planned_workers(config: EngineConfig) -> int:
    """The most workers the engine may run at once (replicas may be added up to ``max_replicas``)."""
    p = config.parallel_config
    replicas = max(p.data_parallel_size, config.replica_config.autoscaling.max_replicas)
    return p.tensor_parallel_size * p.pipeline_parallel_size * replicas


class ExecutorGroup(Executor):
    """The executor of each live replica; calls by global rank go to the executor that holds the rank.

    ``isolated``: replicas have executors of their own (``mp``, ``ray``) and can fail, be rebuilt, added and
    removed one by one. Otherwise one executor serves every replica and a failure is the engine's.
    ``lockstep``: the replicas' steps must run together (every replica joins every step, with an empty batch
    when it has nothing to run), since their workers meet in collectives inside the model."""

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        backend = config.parallel_config.distributed_executor_backend
        self.lockstep = config.parallel_config.experts_span_replicas
        self.isolated = backend in ("mp", "ray")
        self._lock = threading.Lock()  # replicas are built and torn down on other threads than the engine's
        self._executors: dict[int, Executor] = {}
        self._shared: Executor | None = None
        self._owns_ray = False
        if backend == "ray":
            from dist_infer.executor.ray_executor import RayExecutor

            self._owns_ray = RayExecutor.open_session(config, planned_workers(config))
        if not self.isolated:
            self._shared = create_executor(config, replica=None)

    @property
    def max_batches_in_flight(self) -> int:
        return self._shared.max_batches_in_flight if self._shared is not None else self.layout.pp

    def build(self, replica: int) -> Executor:
        """Starts the workers of ``replica`` (isolated backends; blocking, run it off the engine thread) and
        returns its executor once they have loaded."""
        if not self.isolated:
            return self._shared
        if self.lockstep:  # one world for every replica, built once
            with self._lock:
                if replica in self._executors:
                    return self._executors[replica]
            executor = create_executor(self.config, None)
            with self._lock:
                self._executors.update({d: executor for d in range(self.layout.dp)})
            return executor
        executor = create_executor(self.config, replica, self._workers_per_node(excluding=replica))
        with self._lock:
            self._executors[replica] = executor
        return executor

    def remove(self, replica: int, graceful: bool = True) -> None:
        """Stops the workers of ``replica`` (``graceful=False``: at once, they may be hung); in lockstep, of
        every replica, as they share one world."""
        with self._lock:
            executor = self._executors.pop(replica, None)
            if executor is not None and self.lockstep:
                self._executors = {d: e for d, e in self._executors.items() if e is not executor}
        if executor is not None:
            executor.shutdown(graceful)

    def executor_of(self, replica: int) -> Executor:
        return self._shared if self._shared is not None else self._executors[replica]

    def _workers_per_node(self, excluding: int) -> Counter:
        with self._lock:
            others = [e for r, e in self._executors.items() if r != excluding]
        return sum((Counter(getattr(e, "nodes", ())) for e in others), Counter())

    def collective_rpc(self, method: Method, args: tuple = (), kwargs: dict | None = None,
                       ranks: list[int] | None = None) -> list:
        if self._shared is not None:
            return self._shared.collective_rpc(method, args, kwargs, ranks)
        return self._per_replica("collective_rpc", method, args, kwargs, ranks)

    def start_rpc(self, method: Method, args: tuple = (), kwargs: dict | None = None,
                  ranks: list[int] | None = None) -> list[Future]:
        if self._shared is not None:
            return self._shared.start_rpc(method, args, kwargs, ranks)
        return self._per_replica("start_rpc", method, args, kwargs, ranks)

    def _per_replica(self, call: str, method: Method, args: tuple, kwargs: dict | None,
                     ranks: list[int] | None) -> list:
        """``call`` (collective_rpc or start_rpc) on each replica's executor for its share of ``ranks``; the
        answers in ``ranks`` order."""
        ranks, parts = self._split(ranks)
        answers = {}
        for executor, rs in parts:
            answers.update(zip(rs, getattr(executor, call)(method, args, kwargs, rs)))
        return [answers[r] for r in ranks]

    def _split(self, ranks: list[int] | None) -> tuple[list[int], list[tuple[Executor, list[int]]]]:
        """``ranks`` (default: every running worker's) and, per replica executor, the ones it holds."""
        with self._lock:
            executors = dict(self._executors)
        size = self.layout.replica_size
        if ranks is None:
            ranks = [r for d in sorted(executors) for r in self.layout.replica_ranks(d)]
        by_replica: dict[int, list[int]] = {}
        for r in ranks:
            if r // size not in executors:
                raise ValueError(f"rank {r} belongs to replica {r // size}, which is not running")
            by_replica.setdefault(r // size, []).append(r)
        return list(ranks), [(executors[d], rs) for d, rs in by_replica.items()]

    def execute_model(self, scheduler_output: SchedulerOutput, replica: int = 0) -> Future[ModelRunnerOutput]:
        return self.executor_of(replica).execute_model(scheduler_output, replica)

    def node_ids(self) -> list[str]:
        """The node of each running worker, in rank order (Ray; one local node otherwise)."""
        with self._lock:
            executors = list({id(e): e for e in (self._executors[d] for d in sorted(self._executors))}.values())
        if executors and hasattr(executors[0], "node_ids"):
            return [n for e in executors for n in e.node_ids()]
        return ["local"] * len(self.collective_rpc("ping"))

    def shutdown(self, graceful: bool = True) -> None:
        with self._lock:
            executors, self._executors = list({id(e): e for e in self._executors.values()}.values()), {}
        for executor in executors:
            executor.shutdown(graceful)
        if self._shared is not None:
            self._shared.shutdown()
        if self._owns_ray:
            from dist_infer.executor.ray_executor import RayExecutor

            RayExecutor.close_session()
            self._owns_ray = False
