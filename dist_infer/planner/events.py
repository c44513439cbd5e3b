"""Simulated time: an event queue, and hosts whose cores the tasks running on them share.

A task has ``work`` seconds (how long it takes measured with ``threads`` threads per process and nothing else
running), a ``demand`` (the threads it keeps busy: a tensor-parallel group of g processes asks for g x threads)
and an ``efficiency`` e: what each of the host's C cores delivers when all C are busy, relative to one core alone
(measured: a one-thread worker's time alone / its time while C of them run at once; below 1 where the cores share
memory bandwidth or caches). With the tasks
running now asking for D threads in all, the cores are busy o = min(D, C) at a time, and each task progresses at

    rate = min(1, C / D) x b(o) / b(min(threads, C)),   b(o) = 1 - (1 - e) (o - 1) / (C - 1)

(processor sharing: the operating system time-slices the cores among the threads, and each core is as fast as
its occupancy lets it be; a task's own profile already ran at occupancy ``threads``).

A task's finish time moves whenever another task starts or ends on its host. A host without a core count (each
worker owns its GPU) runs every task at rate 1.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable


class EventQueue:
    def __init__(self):
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (max(when, self.now), next(self._seq), action))

    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """Runs events in time order until there are none left or ``until()`` holds."""
        while self._heap and not until():
            self.now, _, action = heapq.heappop(self._heap)
            action()


class _Task:
    __slots__ = ("remaining", "demand", "threads", "efficiency", "done", "last")

    def __init__(self, work: float, demand: float, threads: int, efficiency: float, done: Callable[[], None],
                 now: float):
        self.remaining, self.demand, self.threads, self.efficiency = work, demand, threads, efficiency
        self.done, self.last = done, now


class SharedHost:
    """Tasks sharing ``cores`` (None: unlimited, every task at full speed)."""

    def __init__(self, events: EventQueue, cores: float | None):
        self.events, self.cores = events, cores
        self.tasks: list[_Task] = []
        self._version = 0

    def demand(self) -> float:
        """Threads the running tasks ask for now."""
        return sum(t.demand for t in self.tasks)

    def rate(self, task: _Task) -> float:
        cores = self.cores
        if cores is None:
            return 1.0
        demand = sum(t.demand for t in self.tasks)
        share = min(1.0, cores / demand) if demand > 0 else 1.0
        if cores <= 1:
            return share
        speed = lambda busy: 1.0 - (1.0 - task.efficiency) * (busy - 1) / (cores - 1)  # noqa: E731
        return share * speed(min(demand, cores)) / speed(min(task.threads, cores))

    def run(self, work: float, done: Callable[[], None], demand: float = 1.0, threads: int = 1,
            efficiency: float = 1.0) -> None:
        """Starts a task now; ``done()`` is called when its work is through."""
        self._advance()
        self.tasks.append(_Task(max(work, 0.0), demand, threads, efficiency, done, self.events.now))
        self._reschedule()

    def _advance(self) -> None:
        now = self.events.now
        for task in self.tasks:
            task.remaining -= (now - task.last) * self.rate(task)
            task.last = now

    def _reschedule(self) -> None:
        self._version += 1
        if not self.tasks:
            return
        version = self._version
        wait = min(max(t.remaining, 0.0) / self.rate(t) for t in self.tasks)
        self.events.at(self.events.now + wait, lambda: self._finish(version))

    def _finish(self, version: int) -> None:
        if version != self._version:  # a task started or ended since: this wake-up is stale
            return
        self._advance()
        finished = [t for t in self.tasks if t.remaining <= 1e-12]
        self.tasks = [t for t in self.tasks if t.remaining > 1e-12]
        self._reschedule()
        for task in finished:
            task.done()
