"""The one interface every executor offers the engine."""

from __future__ import annotations

from abc import ABC, abstractmethod

from dist_infer.engine.messages import ModelRunnerOutput, SchedulerOutput


class Executor(ABC):
    @abstractmethod
    def collective_rpc(self, method: str, *args, **kwargs) -> list:
        """Calls ``method`` on every worker; returns their results in rank order."""

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Runs one step; returns the sampled tokens."""

    def determine_num_blocks(self) -> int:
        # Every worker must hold the same blocks, so the smallest budget wins.
        return min(self.collective_rpc("determine_num_blocks"))

    def initialize_cache(self, num_blocks: int) -> None:
        self.collective_rpc("initialize_cache", num_blocks)

    def shutdown(self) -> None:
        pass
