"""Builds and tears down replicas' workers off the engine thread, with backoff and a bounded number of tries.

A build starts a replica's workers (``ExecutorGroup.build``: new processes, or new Ray actors in a new
placement group, wherever Ray finds room), allocates their KV cache and reports the executor. A rebuild
first stops every worker of the failed replica at once (they may be hung), then tries up to
``max_replica_restarts`` builds, waiting ``backoff * 2**attempt`` seconds (at most a minute) before each.
Results are collected by the engine thread between steps (``take_results``), so replicas change state only
there.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from dist_infer.executor.base import Executor
from dist_infer.executor.factory import ExecutorGroup

logger = logging.getLogger("dist_infer.replicas")

_MAX_BACKOFF_S = 60.0


@dataclass
class BuildResult:
    replica: int
    executor: Executor | None  # None: every attempt failed (or the engine is closing)
    seconds: float  # from the request to build until the replica was ready (or given up)
    failed_attempts: int
    error: str | None = None


class ReplicaSupervisor:
    def __init__(self, executors: ExecutorGroup, num_blocks: list[int], max_attempts: int, backoff_s: float,
                 on_result: Callable[[], None] | None = None):
        self.executors, self.num_blocks = executors, num_blocks
        self.max_attempts, self.backoff_s = max_attempts, backoff_s
        self._on_result = on_result or (lambda: None)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dist-infer-replica")
        self._results: queue.SimpleQueue[BuildResult] = queue.SimpleQueue()
        self._closing = threading.Event()
        self.changed = threading.Event()  # set whenever a result is ready

    def rebuild(self, replica: int) -> None:
        """Stops the failed replica's workers, then builds new ones (``max_attempts`` tries)."""
        self._pool.submit(self._run, replica, True, self.max_attempts)

    def add(self, replica: int) -> None:
        """Builds a new replica (scale-up): one try plus ``max_attempts`` retries."""
        self._pool.submit(self._run, replica, False, self.max_attempts + 1)

    def stop(self, replica: int, graceful: bool = True) -> None:
        """Stops a replica's workers in the background (drained, or failed for good)."""
        self._pool.submit(self.executors.remove, replica, graceful)

    def take_results(self) -> list[BuildResult]:
        self.changed.clear()
        results = []
        while True:
            try:
                results.append(self._results.get_nowait())
            except queue.Empty:
                return results

    def close(self) -> None:
        """Abandons pending builds (a build under way finishes, and its workers are stopped with the rest)."""
        self._closing.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, replica: int, teardown: bool, attempts: int) -> None:
        start, error, failed = time.monotonic(), None, 0
        if teardown:
            self.executors.remove(replica, graceful=False)
        for attempt in range(attempts):
            delay = min(self.backoff_s * 2 ** attempt, _MAX_BACKOFF_S) if teardown or attempt else 0.0
            if self._closing.wait(delay):
                break
            try:
                executor = self.executors.build(replica)
                executor.initialize_cache(self.num_blocks)
            except Exception as e:
                failed += 1
                error = f"{type(e).__name__}: {e}"
                logger.warning("replica %d: build attempt %d of %d failed: %s", replica, attempt + 1, attempts, error)
                self.executors.remove(replica, graceful=False)
                continue
            if self._closing.is_set():  # the engine shut down meanwhile: nobody will collect it
                self.executors.remove(replica)
                return
            self._report(BuildResult(replica, executor, time.monotonic() - start, failed))
            return
        self._report(BuildResult(replica, None, time.monotonic() - start, failed, error or "the engine is closing"))

    def _report(self, result: BuildResult) -> None:
        self._results.put(result)
        self.changed.set()
        self._on_result()
