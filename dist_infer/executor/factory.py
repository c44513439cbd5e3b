"""The executor for a config's ``distributed_executor_backend``."""

from __future__ import annotations

from dist_infer.config import EngineConfig
from dist_infer.executor.base import Executor


def create_executor(config: EngineConfig) -> Executor:
    backend = config.parallel_config.distributed_executor_backend
    if backend == "uni":
        from dist_infer.executor.uniproc import UniProcExecutor

        return UniProcExecutor(config)
    if backend == "mp":
        from dist_infer.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config)
    if backend == "ray":
        from dist_infer.executor.ray_executor import RayExecutor

        return RayExecutor(config)
    from dist_infer.executor.torchrun import TorchrunExecutor

    return TorchrunExecutor(config)
