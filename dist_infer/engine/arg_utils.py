"""Engine settings under vLLM's argument names, shared by ``LLM``, the CLI and the server."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from dist_infer.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig


@dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    skip_tokenizer_init: bool = False
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    pipeline_layer_partition: list[int] | None = None
    ray_address: str | None = None
    pipeline_placement: str = "PACK"
    worker_timeout_s: float = 300.0
    max_batches_in_flight: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_fraction: float = 0.1
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int | None = None

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def create_engine_config(self) -> EngineConfig:
        parallel = ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size, self.data_parallel_size,
                                  self.distributed_executor_backend, self.pipeline_layer_partition, self.ray_address,
                                  self.pipeline_placement, self.worker_timeout_s, self.max_batches_in_flight)
        model = ModelConfig(self.model, self.tokenizer, self.dtype, self.seed, self.max_model_len,
                            self.skip_tokenizer_init)
        cache = CacheConfig(self.block_size, self.kv_cache_memory, self.gpu_memory_utilization,
                            self.cpu_kv_cache_fraction, self.num_gpu_blocks_override, self.enable_prefix_caching)
        scheduler = SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, self.long_prefill_token_threshold)
        return EngineConfig(model, cache, scheduler, parallel)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("model and engine")
        g.add_argument("--model", "-m", default=None,
                       help="local Hugging Face folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
        g.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
        g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--max-model-len", type=int, default=None)
        g.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
        g.add_argument("--pipeline-parallel-size", "--pp", type=int, default=1)
        g.add_argument("--data-parallel-size", "--dp", type=int, default=1)
        g.add_argument("--distributed-executor-backend", "--executor", default=None,
                       help="uni, mp, ray or torchrun (default: uni for one worker, else mp)")
        g.add_argument("--pipeline-layer-partition", type=lambda s: [int(x) for x in s.split(",")], default=None,
                       help="layers per pipeline stage, comma-separated (default: even split)")
        g.add_argument("--ray-address", default=None, help="Ray cluster to join (default: a running one, else local)")
        g.add_argument("--pipeline-placement", default="PACK", choices=["PACK", "SPREAD"],
                       help="Ray: keep a replica's stages together (PACK) or one node per stage (SPREAD)")
        g.add_argument("--worker-timeout", dest="worker_timeout_s", type=float, default=300.0,
                       help="seconds before a silent worker is reported as hung")
        g.add_argument("--block-size", type=int, default=16)
        g.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV cache")
        g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
        g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
        g.add_argument("--max-num-seqs", type=int, default=256)
        g.add_argument("--max-num-batched-tokens", type=int, default=2048)
        g.add_argument("--long-prefill-token-threshold", type=int, default=None)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in known})
