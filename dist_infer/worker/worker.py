"""A worker process's entry points: set up the device, load the model, size and allocate the KV cache, run steps."""

from __future__ import annotations

import torch

from dist_infer.config import EngineConfig
from dist_infer.engine.kv_cache_manager import cdiv
from dist_infer.engine.messages import ModelRunnerOutput, SchedulerOutput
from dist_infer.worker.memory import kv_cache_budget
from dist_infer.worker.model_runner import ModelRunner


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class Worker:
    def __init__(self, config: EngineConfig, device: torch.device | None = None):
        self.config = config
        self.device = device or default_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # Unseeded requests draw from the global generator: seeding it makes whole runs repeatable.
        torch.manual_seed(config.model_config.seed)
        self.runner = ModelRunner(config, self.device)

    def determine_num_blocks(self) -> int:
        cache = self.config.cache_config
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        per_block = self.runner.kv_bytes_per_block()
        budget = kv_cache_budget(cache, self.device)
        if budget < per_block:
            raise ValueError(
                f"KV cache budget of {max(budget, 0)} bytes is less than one block ({per_block} bytes); "
                f"raise kv_cache_memory or gpu_memory_utilization"
            )
        # More blocks than every sequence at full length can use would only waste memory.
        ceiling = self.config.scheduler_config.max_num_seqs * cdiv(self.config.model_config.max_model_len, cache.block_size)
        return min(budget // per_block, ceiling)

    def initialize_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(scheduler_output)
