"""One worker: its device and threads, its place in the process groups, its stage of the model, its KV cache.

Executors create workers (in this process, in child processes, in Ray actors, or under torchrun) and call
these methods; everything a worker needs to know arrives in the engine config and its rank.
"""

from __future__ import annotations

import gc
import os
import time

import torch

from dist_infer.config import EngineConfig
from dist_infer.distributed.layout import layout_of
from dist_infer.distributed.parallel_state import collective_bytes, get_pp_group, get_tp_group, init_distributed
from dist_infer.engine.kv_cache_manager import cdiv
from dist_infer.engine.messages import ModelRunnerOutput, SchedulerOutput
from dist_infer.worker.memory import PeakMemory, anon_rss_bytes, kv_cache_budget
from dist_infer.worker.model_runner import ModelRunner


def pick_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0, init_method: str | None = None, local_rank: int = 0,
                 num_threads: int | None = None, device: torch.device | None = None, local_world_size: int = 1,
                 world_ranks: list[int] | None = None):
        """``local_world_size``: how many workers run on this host (this one included); they share its RAM,
        so each takes that share of the CPU KV-cache budget (see ``kv_cache_budget``). ``world_ranks``: the
        ranks of this worker's torch world (default: all; see ``init_distributed``)."""
        self.config, self.rank, self.local_world_size = config, rank, local_world_size
        self.device = device or pick_device(local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if num_threads:
            torch.set_num_threads(num_threads)
        layout = layout_of(config)
        if len(world_ranks or range(layout.world_size)) > 1:
            init_distributed(layout, rank, init_method, self.device, config.parallel_config.collective_timeout_s,
                             world_ranks)
        # Unseeded requests draw from the global generator: seeding it makes whole runs repeatable.
        torch.manual_seed(config.model_config.seed)
        self.coords = layout.coords(rank)
        memory = PeakMemory()
        self.runner = ModelRunner(config, self.device, memory.sample)
        # Garbage left from before (an earlier engine in this process) would otherwise be freed at some later
        # moment and hide part of what the KV cache costs from ``anon_rss_bytes - anon_rss_after_load``.
        gc.collect()
        self.load_report = {
            "rank": rank,
            "tp_rank": get_tp_group().rank_in_group,
            "pp_rank": get_pp_group().rank_in_group,
            "parameter_bytes": self.runner.model.parameter_bytes,
            "expert_bytes": self.runner.model.expert_bytes,  # of parameter_bytes: mixture-of-experts weights
            "local_experts": self.runner.model.local_experts,  # experts held (whole or sliced) in each MoE layer
            "load_peak_memory_increase": memory.increase,  # private memory, sampled after every tensor
            "anon_rss_after_load": anon_rss_bytes(),
            "pid": os.getpid(),
        }
        self.kv_cache_bytes = 0
        self.steps, self.step_seconds, self.ready_at = 0, 0.0, time.monotonic()

    def memory_report(self) -> dict:
        """What loading took, the KV cache's bytes (all of them resident: the cache is filled when allocated),
        per KV-cache group its window (None: full attention), usable blocks and bytes per block here, and the
        private memory this process holds now."""
        store = self.runner.kv_store
        return dict(self.load_report, kv_cache_bytes=self.kv_cache_bytes, anon_rss_bytes=anon_rss_bytes(),
                    kv_group_windows=list(store.groups.windows), kv_group_blocks=list(store.num_blocks),
                    kv_group_bytes_per_block=store.group_bytes_per_block())

    def kv_cache_budget(self) -> int:
        """Bytes this worker may give its KV cache (its share of the host's budget; see ``kv_cache_budget``)."""
        return kv_cache_budget(self.config.cache_config, self.device, self.local_world_size)

    def determine_num_blocks(self) -> list[int]:
        """Usable blocks per KV-cache group (``kv_cache_groups``): each sliding group gets what its windows
        need (``KVCacheGroups.sliding_blocks``), the full-attention group the rest of the budget -- unless giving
        every group the same count (the layout without groups) leaves the full group more."""
        cache, sched = self.config.cache_config, self.config.scheduler_config
        groups = self.runner.kv_store.groups
        if cache.num_gpu_blocks_override is not None:
            return [cache.num_gpu_blocks_override] * len(groups)
        per_group = self.runner.kv_group_bytes_per_block()
        per_block = sum(per_group)
        budget = self.kv_cache_budget()
        nulls = sum(groups.null_blocks(g) * b for g, b in enumerate(per_group))
        if budget - nulls < per_block:
            raise ValueError(
                f"KV cache budget of {max(budget, 0)} bytes is less than one block ({per_block} bytes); "
                f"raise kv_cache_memory, gpu_memory_utilization or cpu_kv_cache_fraction (on the CPU it is "
                f"shared by the {self.local_world_size} worker(s) of this host)"
            )
        # More blocks than every sequence at full length can use would only waste memory.
        ceiling = sched.max_num_seqs * cdiv(self.config.model_config.max_model_len, cache.block_size)
        uniform = [min((budget - nulls) // per_block, ceiling)] * len(groups)
        in_flight = self.config.parallel_config.max_batches_in_flight
        split = [groups.sliding_blocks(g, sched.max_num_seqs, sched.max_num_batched_tokens,
                                       self.config.model_config.max_model_len, cache.block_size, in_flight)
                 if groups.is_sliding(g) else 0 for g in range(len(groups))]
        rest = budget - nulls - sum(n * b for n, b in zip(split, per_group))
        split[0] = min(rest // per_group[0], ceiling) if per_group[0] else ceiling
        return split if split[0] >= uniform[0] else uniform

    def initialize_cache(self, num_blocks: list[int]) -> None:
        self.runner.allocate_kv_cache(num_blocks)
        self.kv_cache_bytes = self.runner.kv_store.allocated_bytes()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        start = time.perf_counter()
        try:
            return self.runner.execute_model(scheduler_output)
        finally:
            self.steps += 1
            self.step_seconds += time.perf_counter() - start

    def timing(self) -> dict:
        """Where this worker's time went since it was ready: computing steps, waiting for the previous stage's
        activations inside a step, or idle (no step to run: the pipeline bubble, or no work at all)."""
        uptime = time.monotonic() - self.ready_at
        wait = self.runner.recv_wait_seconds
        return {"rank": self.rank, "dp_rank": self.coords[0], "pp_rank": self.coords[1], "tp_rank": self.coords[2],
                "steps": self.steps, "compute_seconds": self.step_seconds - wait, "recv_wait_seconds": wait,
                "uptime_seconds": uptime}

    def collective_bytes(self) -> dict[str, int]:
        """Bytes this worker's collectives have handed in so far, per named group (``parallel_state``)."""
        return collective_bytes()

    def ping(self) -> int:
        return self.rank
