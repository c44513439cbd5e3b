"""The one interface every executor offers the engine, and the errors it raises.

An executor moves calls to workers and results back, and nothing else: ``collective_rpc`` calls a method
on workers and waits; ``execute_model`` hands one scheduler output to the workers of a data-parallel
replica and returns a future of the sampled tokens, so that up to ``max_batches_in_flight`` steps can be
in flight (one per pipeline stage).
"""

from __future__ import annotations

import traceback
from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import Any, Callable

from dist_infer.config import EngineConfig
from dist_infer.distributed.layout import layout_of
from dist_infer.engine.messages import ModelRunnerOutput, SchedulerOutput

Method = str | Callable[..., Any]  # a Worker method name, or a function called as fn(worker, *args)


class WorkerError(RuntimeError):
    """A worker failed: it raised, died, or did not answer in time. Names the rank and its place."""

    def __init__(self, rank: int, coords: tuple[int, int, int], what: str, detail: str):
        dp, pp, tp = coords
        self.rank = rank
        super().__init__(f"worker rank {rank} (dp {dp}, pp {pp}, tp {tp}) failed in {what}: {detail.strip()}")


def run_method(worker, method: Method, args: tuple, kwargs: dict):
    """Worker-side dispatch of an RPC."""
    if callable(method):
        return method(worker, *args, **kwargs)
    return getattr(worker, method)(*args, **kwargs)


def format_failure(exc: BaseException) -> str:
    """What travels back from a worker: the exception on one line, then where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


class Executor(ABC):
    def __init__(self, config: EngineConfig):
        self.config = config
        self.layout = layout_of(config)

    @property
    def max_batches_in_flight(self) -> int:
        return 1

    @abstractmethod
    def collective_rpc(self, method: Method, args: tuple = (), kwargs: dict | None = None,
                       ranks: list[int] | None = None) -> list:
        """Calls ``method`` on the given workers (default: all); their results in rank order."""

    def start_rpc(self, method: Method, args: tuple = (), kwargs: dict | None = None,
                  ranks: list[int] | None = None) -> list[Future]:
        """Starts ``method`` on the given workers without waiting for them: one future per worker, in rank
        order. Executors whose calls run on the caller's thread (uni, torchrun) run it here and return
        settled futures."""
        try:
            results = self.collective_rpc(method, args, kwargs, ranks)
        except Exception as e:
            failed: Future = Future()
            failed.set_exception(e)
            return [failed] * max(1, len(ranks or ()))
        settled = []
        for result in results:
            future: Future = Future()
            future.set_result(result)
            settled.append(future)
        return settled

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput, replica: int = 0) -> Future[ModelRunnerOutput]:
        """Starts one step on a replica; the future holds what its sampling rank returned."""

    def determine_num_blocks(self) -> list[int]:
        """Usable blocks per KV-cache group. Every worker must hold the same blocks, so in each group the
        smallest budget wins."""
        return [min(counts) for counts in zip(*self.collective_rpc("determine_num_blocks"))]

    def initialize_cache(self, num_blocks: list[int]) -> None:
        self.collective_rpc("initialize_cache", (num_blocks,))

    def shutdown(self, graceful: bool = True) -> None:
        """Stops the workers; ``graceful=False`` does not wait for them (a failed replica's may be hung)."""

