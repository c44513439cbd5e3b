"""Simulated time: an event queue, and hosts whose cores the tasks running on them share.

A task has ``work`` seconds (how long it takes with the resources it asks for to itself) and a ``demand`` (the
cores it keeps busy). On a host of ``C`` cores the running tasks of total demand ``D`` each progress at rate
``min(1, C / D)`` (processor sharing: the operating system time-slices the cores among them), so a task's
finish time moves whenever another task starts or ends on its host. A host without a core count (each worker
owns its GPU) runs every task at rate 1.
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
    __slots__ = ("remaining", "demand", "done", "last")

    def __init__(self, work: float, demand: float, done: Callable[[], None], now: float):
        self.remaining, self.demand, self.done, self.last = work, demand, done, now


class SharedHost:
    """Tasks sharing ``cores`` (None: unlimited, every task at full speed)."""

    def __init__(self, events: EventQueue, cores: float | None):
        self.events, self.cores = events, cores
        self.tasks: list[_Task] = []
        self._version = 0

    def rate(self) -> float:
        demand = sum(t.demand for t in self.tasks)
        if self.cores is None or demand <= self.cores:
            return 1.0
        return self.cores / demand

    def run(self, work: float, demand: float, done: Callable[[], None]) -> None:
        """Starts a task now; ``done()`` is called when its work is through."""
        self._advance()
        self.tasks.append(_Task(max(work, 0.0), demand, done, self.events.now))
        self._reschedule()

    def _advance(self) -> None:
        now, rate = self.events.now, self.rate()
        for task in self.tasks:
            task.remaining -= (now - task.last) * rate
            task.last = now

    def _reschedule(self) -> None:
        self._version += 1
        if not self.tasks:
            return
        version, rate = self._version, self.rate()
        first = min(self.tasks, key=lambda t: t.remaining)
        self.events.at(self.events.now + max(first.remaining, 0.0) / rate, lambda: self._finish(version))

    def _finish(self, version: int) -> None:
        if version != self._version:  # a task started or ended since: this wake-up is stale
            return
        self._advance()
        finished = [t for t in self.tasks if t.remaining <= 1e-12]
        self.tasks = [t for t in self.tasks if t.remaining > 1e-12]
        self._reschedule()
        for task in finished:
            task.done()
