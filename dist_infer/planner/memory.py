"""What one worker of a layout holds, and how many KV blocks are left for a replica.

Per worker: its stage's weights (``ModelShape.stage_weight_bytes``), a reserve for the step's activations and
workspaces, and the KV cache in what remains of its budget:

* GPU: ``gpu_memory_utilization x device memory`` (as the engine sizes it); the reserve holds one step of
  ``max_num_batched_tokens`` activations (hidden states, qkv, MLP) in the model's dtype, fp32 logits of
  ``max_num_seqs`` rows, and the decode workspace the attention path gathers K/V into: every running sequence
  padded to the longest one of the workload (``max_num_seqs x longest x K/V per token``);
* CPU: ``kv_cache_memory`` when set, else ``cpu_kv_cache_fraction`` of the RAM available, split among the host's
  workers (``worker.memory.kv_cache_budget``); weights and reserve must fit in the rest of the RAM.

Every layer is counted as keeping the whole context (a sliding-window layer keeps less: the plan errs on the safe
side for such models). A replica's usable blocks are the fewest any of its stages can hold (every stage keeps every request's blocks
for its own layers), capped, as the workers cap them, at ``max_num_seqs`` full-length sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_infer.kv_cache_groups import cdiv
from dist_infer.planner.model_shape import ModelShape
from dist_infer.planner.step_shape import Layout


@dataclass(frozen=True)
class WorkerMemory:
    weights: float  # bytes, the largest stage's
    reserve: float  # activations and workspaces
    kv_budget: float  # bytes for the KV cache per worker
    kv_bytes_per_token: float  # on the stage with most layers
    num_blocks: int  # usable per replica (0: nothing fits)
    capacity: float  # bytes a worker may use in all
    block_size: int

    @property
    def kv_bytes(self) -> float:
        """The KV cache a worker allocates for ``num_blocks`` blocks."""
        return self.num_blocks * self.block_size * self.kv_bytes_per_token

    @property
    def total(self) -> float:
        return self.weights + self.reserve + self.kv_bytes


def activation_reserve(model: ModelShape, tp: int, max_num_batched_tokens: int, max_num_seqs: int,
                       longest: int) -> float:
    h, d = model.hidden, model.head_dim
    per_token = (6 * h + (model.heads // tp + 2 * model.kv_heads_per_rank(tp)) * d + 3 * (model.intermediate // tp))
    activations = max_num_batched_tokens * per_token * model.dtype_bytes
    logits = max_num_seqs * model.vocab * 4
    workspace = max_num_seqs * longest * 2 * model.kv_heads_per_rank(tp) * d * (model.kv_bytes or model.dtype_bytes)
    return activations + logits + workspace


def worker_memory(model: ModelShape, layout: Layout, *, device_memory: float | None, host_memory: float,
                  gpu_memory_utilization: float, kv_cache_memory: int | None, cpu_kv_cache_fraction: float,
                  block_size: int, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                  longest: int, workers_on_host: int) -> WorkerMemory:
    """``device_memory``: bytes per GPU (None: the workers run on the CPU from ``host_memory`` bytes of RAM)."""
    weights = max(model.stage_weight_bytes(layout.tp, n, s == 0, s == layout.pp - 1)
                  for s, n in enumerate(layout.layers))
    reserve = activation_reserve(model, layout.tp, max_num_batched_tokens, max_num_seqs, longest)
    if device_memory is not None:
        capacity = device_memory * gpu_memory_utilization
        budget = kv_cache_memory if kv_cache_memory is not None else capacity - weights - reserve
        fits = weights + reserve + (kv_cache_memory or 0) <= capacity
    else:
        capacity = host_memory / workers_on_host
        budget = kv_cache_memory if kv_cache_memory is not None else host_memory * cpu_kv_cache_fraction / \
            workers_on_host
        fits = weights + reserve + budget <= capacity
    per_token = model.kv_bytes_per_token(layout.tp, max(layout.layers))
    blocks = int(max(budget, 0) // (per_token * block_size)) if fits else 0
    blocks = min(blocks, max_num_seqs * cdiv(max_model_len, block_size))
    return WorkerMemory(weights, reserve, max(budget, 0), per_token, blocks, capacity, block_size)
