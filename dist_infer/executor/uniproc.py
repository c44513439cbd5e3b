"""Everything in the calling process: one worker, tp = pp = 1."""

from __future__ import annotations

from dist_infer.config import EngineConfig
from dist_infer.engine.messages import ModelRunnerOutput, SchedulerOutput
from dist_infer.executor.base import Executor
from dist_infer.worker.worker import Worker


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig):
        self.worker = Worker(config)

    def collective_rpc(self, method: str, *args, **kwargs) -> list:
        return [getattr(self.worker, method)(*args, **kwargs)]

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)
