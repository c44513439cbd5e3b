"""Everything in the calling process: one worker, tp = pp = dp = 1."""

from __future__ import annotations

from concurrent.futures import Future

from dist_infer.config import EngineConfig
from dist_infer.engine.messages import ModelRunnerOutput, SchedulerOutput
from dist_infer.executor.base import Executor, Method, run_method
from dist_infer.worker.worker import Worker


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.worker = Worker(config)

    def collective_rpc(self, method: Method, args: tuple = (), kwargs: dict | None = None,
                       ranks: list[int] | None = None) -> list:
        return [run_method(self.worker, method, args, kwargs or {})]

    def execute_model(self, scheduler_output: SchedulerOutput, replica: int = 0) -> Future[ModelRunnerOutput]:
        future: Future = Future()
        future.set_result(self.worker.execute_model(scheduler_output))
        return future
