"""Health checks of replicas without steps in flight, started on the engine thread and never waited for there.

A replica with a step in flight needs no probe: a worker that dies fails the step, one that hangs makes the
step older than the step timeout (``ReplicaManager``). An idle replica's worker could die or hang unnoticed
until a request lands on it, so every ``period_s`` each idle serving replica gets a ``ping`` to all its
workers. The engine thread only starts the pings (a message per worker) and looks at them on its next tick:

    any ping raised (the worker is gone)            -> the replica fails at once
    some ping unanswered after ``timeout_s``        -> the replica fails as hung, naming the silent ranks
    all answered                                    -> healthy until the next period

``probe`` starts a check now and hands its futures to a caller that waits for them on its own thread
(``/ready``), so a hung worker never stalls the engine thread, and the other replicas' steps go on.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Iterable

from dist_infer.engine.engine_core import EngineCore
from dist_infer.engine.replica import Replica, ReplicaState
from dist_infer.executor.factory import ExecutorGroup


@dataclass
class _Probe:
    core: EngineCore  # the incarnation probed: a replica rebuilt since then is not judged by it
    ranks: list[int]
    futures: list[Future]
    started: float


class HealthChecker:
    def __init__(self, executors: ExecutorGroup, period_s: float, timeout_s: float,
                 on_error: Callable[[], None] = lambda: None):
        self.executors, self.period_s, self.timeout_s = executors, period_s, timeout_s
        self.on_error = on_error  # wakes the engine thread so a dead worker is handled without waiting a tick
        self._probes: dict[int, _Probe] = {}
        self._checked: dict[int, float] = {}  # replica index -> when its last probe came back whole

    def probe(self, replica: Replica, now: float | None = None) -> list[Future]:
        """Pings every worker of ``replica`` (engine thread, does not block); the pings' futures. A probe
        already running is shared rather than doubled."""
        running = self._probes.get(replica.index)
        if running is not None and running.core is replica.core:
            return running.futures
        ranks = self.executors.layout.replica_ranks(replica.index)
        futures = self.executors.start_rpc("ping", ranks=ranks)
        for future in futures:
            future.add_done_callback(lambda f: f.exception() is not None and self.on_error())
        self._probes[replica.index] = _Probe(replica.core, ranks, futures, time.monotonic() if now is None else now)
        return futures

    def tick(self, replicas: Iterable[Replica], now: float, periodic: bool) -> list[tuple[Replica, BaseException]]:
        """Judges the probes in flight and (``periodic``) starts the ones that are due; the replicas to fail
        and why."""
        failed = []
        for replica in replicas:
            probe = self._probes.get(replica.index)
            if probe is not None:
                verdict = self._judge(replica, probe, now)
                if verdict is not None:
                    failed.append((replica, verdict))
            idle = replica.state == ReplicaState.SERVING and replica.core is not None and replica.core.oldest is None
            if (periodic and idle and replica.index not in self._probes
                    and now - self._checked.get(replica.index, replica.changed_at) >= self.period_s):
                self.probe(replica, now)
        return failed

    def _judge(self, replica: Replica, probe: _Probe, now: float) -> BaseException | None:
        if replica.core is not probe.core or replica.state not in (ReplicaState.SERVING, ReplicaState.DRAINING):
            del self._probes[replica.index]  # failed, stopped or rebuilt since: nothing left to judge
            return None
        for future in probe.futures:
            if future.done() and future.exception() is not None:
                del self._probes[replica.index]
                return future.exception()
        silent = [r for r, f in zip(probe.ranks, probe.futures) if not f.done()]
        if not silent:
            del self._probes[replica.index]
            self._checked[replica.index] = now
            return None
        if now - probe.started >= self.timeout_s:
            del self._probes[replica.index]
            return TimeoutError(f"replica {replica.index}: worker rank(s) {silent} did not answer a health check "
                                f"within {self.timeout_s:.0f}s")
        return None
