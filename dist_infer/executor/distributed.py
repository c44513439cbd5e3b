"""What the multi-process executors share: a handle per worker whose calls return futures in call order,
and the waiting, gathering and error reporting around them."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from concurrent.futures import FIRST_EXCEPTION, Future, wait

from dist_infer.engine.messages import ModelRunnerOutput, SchedulerOutput
from dist_infer.executor.base import Executor, Method, WorkerError


class WorkerHandle(ABC):
    """One remote worker. Calls run one at a time on the worker, in the order they were made."""

    def __init__(self, rank: int, coords: tuple[int, int, int]):
        self.rank, self.coords = rank, coords

    @abstractmethod
    def call(self, method: Method, args: tuple = (), kwargs: dict | None = None) -> Future:
        """Queues a call; its future fails with a WorkerError if the worker raises or dies."""

    @abstractmethod
    def shutdown(self, graceful: bool = True) -> None:
        """Stops the worker (``graceful=False``: at once, it may be hung); nothing of it may remain afterwards."""

    def error(self, what: str, detail: str) -> WorkerError:
        return WorkerError(self.rank, self.coords, what, detail)


class StepFuture(Future):
    """Completes when every worker of a replica has finished the step; holds the sampling rank's result."""

    def __init__(self, futures: list[Future], ranks: list[int], output_rank: int):
        super().__init__()
        self._futures, self.ranks = futures, ranks
        self._output = futures[ranks.index(output_rank)]
        self._remaining = len(futures)
        self._lock = threading.Lock()
        for f in futures:
            f.add_done_callback(self._one_done)

    def pending_ranks(self) -> list[int]:
        return [r for r, f in zip(self.ranks, self._futures) if not f.done()]

    def _one_done(self, f: Future) -> None:
        with self._lock:
            self._remaining -= 1
            if self.done():
                return
            if f.exception() is not None:
                self.set_exception(f.exception())
            elif self._remaining == 0:
                self.set_result(self._output.result())


class DistributedExecutor(Executor):
    """Executors whose workers live in other processes (local or Ray): the workers of one data-parallel
    replica (``replica``), which form a torch world of their own, so that the replica fails and is rebuilt
    alone; or, with ``replica=None``, the workers of every replica in one world (replicas whose experts are
    spread over each other's workers). ``handles`` maps each of its global ranks to its worker."""

    handles: dict[int, WorkerHandle]

    def __init__(self, config, replica: int | None = 0):
        super().__init__(config)
        self.replica = replica
        self.replicas = list(range(self.layout.dp)) if replica is None else [replica]
        self.ranks = [r for d in self.replicas for r in self.layout.replica_ranks(d)]
        self.handles = {}

    @property
    def max_batches_in_flight(self) -> int:
        return self.layout.pp

    def collective_rpc(self, method: Method, args: tuple = (), kwargs: dict | None = None,
                       ranks: list[int] | None = None) -> list:
        ranks = list(self.ranks) if ranks is None else list(ranks)
        futures = self.start_rpc(method, args, kwargs, ranks)
        return self.wait_all(futures, ranks, method if isinstance(method, str) else method.__name__)

    def start_rpc(self, method: Method, args: tuple = (), kwargs: dict | None = None,
                  ranks: list[int] | None = None) -> list[Future]:
        ranks = list(self.ranks) if ranks is None else list(ranks)
        return [self.handles[r].call(method, args, kwargs or {}) for r in ranks]

    def wait_all(self, futures: list[Future], ranks: list[int], what: str, timeout: float | None = None) -> list:
        """The futures' results in order; the first failure, or a WorkerError naming the silent ranks after
        ``timeout`` seconds (default: ``worker_timeout_s``)."""
        if timeout is None:
            timeout = self.config.parallel_config.worker_timeout_s
        done, not_done = wait(futures, timeout=timeout, return_when=FIRST_EXCEPTION)
        for f in futures:
            if f in done and f.exception() is not None:
                raise f.exception()
        if not_done:
            late = [r for r, f in zip(ranks, futures) if f in not_done]
            raise self.handles[late[0]].error(what, f"no answer within {timeout:.0f}s (ranks {late} silent)")
        return [f.result() for f in futures]

    def wait_loaded(self, loads: list[Future]) -> None:
        """Waits for every worker's load (one future per rank, in ``ranks`` order), for up to
        ``worker_load_timeout_s``."""
        self.wait_all(loads, list(self.ranks), "load", self.config.parallel_config.worker_load_timeout_s)

    def execute_model(self, scheduler_output: SchedulerOutput, replica: int = 0) -> Future[ModelRunnerOutput]:
        ranks = self.layout.replica_ranks(replica)
        payload = self.prepare_payload(scheduler_output)
        futures = [self.handles[r].call("execute_model", (payload,)) for r in ranks]
        return StepFuture(futures, ranks, self.layout.output_rank(replica))

    def prepare_payload(self, scheduler_output: SchedulerOutput):
        """What is sent to each worker of the step (Ray stores it once and sends a reference)."""
        return scheduler_output

    def shutdown(self, graceful: bool = True) -> None:
        for handle in getattr(self, "handles", {}).values():
            handle.shutdown(graceful)
