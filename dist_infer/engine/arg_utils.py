"""Engine settings under vLLM's argument names, shared by ``LLM``, the CLI and the server."""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, fields

from dist_infer.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from dist_infer.engine.autoscaling import AutoscalingConfig
from dist_infer.model_loader.resolve import resolve_model_path
from dist_infer.replica_config import ReplicaConfig


@dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    skip_tokenizer_init: bool = False
    quantization: str | None = None
    quantization_group_size: int = 64
    quantize_lm_head: bool | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    pipeline_layer_partition: list[int] | None = None
    ray_address: str | None = None
    pipeline_placement: str = "PACK"
    worker_timeout_s: float = 300.0
    worker_load_timeout_s: float = 1800.0
    max_batches_in_flight: int | None = None
    enable_expert_parallel: bool = False
    block_size: int = 16
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_fraction: float = 0.1
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int | None = None
    max_replica_restarts: int = 3
    replica_restart_backoff_s: float = 1.0
    migration_limit: int = 3
    no_replica_timeout_s: float = 120.0
    drain_timeout_s: float = 60.0
    health_check_period_s: float = 5.0
    # Autoscaling under Ray Serve's names (see AutoscalingConfig); None: not given.
    min_replicas: int | None = None
    max_replicas: int | None = None
    initial_replicas: int | None = None
    target_ongoing_requests: float | None = None
    upscale_delay_s: float | None = None
    downscale_delay_s: float | None = None
    look_back_period_s: float | None = None
    metrics_interval_s: float | None = None
    upscaling_factor: float | None = None
    downscaling_factor: float | None = None
    config_file: str | None = None  # where these values came from, for error messages

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def create_engine_config(self) -> EngineConfig:
        if self.config_file is None:
            return self._create_engine_config()
        try:
            return self._create_engine_config()
        except ValueError as e:
            raise ValueError(f"{self.config_file} (engine section, or a flag overriding it): {e}") from None

    def _create_engine_config(self) -> EngineConfig:
        autoscaling = self._autoscaling()
        backend = self.distributed_executor_backend
        if backend is None and autoscaling.max_replicas > 1:
            backend = "mp"  # replicas that come and go need workers of their own, even when one would do today
        parallel = ParallelConfig(**{**self._fields_of(ParallelConfig), "distributed_executor_backend": backend,
                                     "data_parallel_size": autoscaling.initial_replicas})
        # The one place the model a user names (None: the default model; a .gguf file) becomes a folder,
        # converting it if need be. int4 with groups of 32 is what llama.cpp's Q4_0 / Q4_1 store: such GGUF
        # files load without a fp32 detour.
        folder = resolve_model_path(self.model, keep_gguf_quantization=(
            self.quantization == "int4" and self.quantization_group_size == 32))
        model = ModelConfig(**{**self._fields_of(ModelConfig), "model": folder})
        cache = CacheConfig(**self._fields_of(CacheConfig))
        scheduler = SchedulerConfig(**self._fields_of(SchedulerConfig))
        replicas = ReplicaConfig(**{**self._fields_of(ReplicaConfig), "autoscaling": autoscaling})
        return EngineConfig(model, cache, scheduler, parallel, replicas)

    def _autoscaling(self) -> AutoscalingConfig:
        """The policy given (any of its fields set), else a fixed count of ``data_parallel_size`` replicas.
        With a policy, the engine starts with ``initial_replicas`` and ``data_parallel_size`` must agree."""
        given = {f.name: getattr(self, f.name) for f in fields(AutoscalingConfig)
                 if hasattr(self, f.name) and getattr(self, f.name) is not None}
        dp = self.data_parallel_size
        if not given:
            if not isinstance(dp, int) or isinstance(dp, bool) or dp < 1:
                raise ValueError(f"data_parallel_size must be a positive int, got {dp!r}")
            return AutoscalingConfig(min_replicas=dp, max_replicas=dp)
        autoscaling = AutoscalingConfig(**given)
        if dp != 1 and dp != autoscaling.initial_replicas:
            raise ValueError(
                f"data_parallel_size={dp} disagrees with the autoscaling policy, which starts with "
                f"{autoscaling.initial_replicas} replica(s); give initial_replicas instead of data_parallel_size")
        return autoscaling

    def _fields_of(self, config_cls) -> dict:
        """This object's values for the fields ``config_cls`` takes, by name (the ones this class has)."""
        return {f.name: getattr(self, f.name) for f in fields(config_cls) if f.init and hasattr(self, f.name)}

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Engine flags. Their defaults live in this dataclass, not in the parser: a flag absent from the
        command line is absent from the parsed namespace, so a config file's value is not overridden by it."""
        g = parser.add_argument_group("model and engine")
        add = functools.partial(g.add_argument, default=argparse.SUPPRESS)
        add("--config", dest="config_file", metavar="FILE.yaml",
            help="cluster config (see cluster_configs/); flags given here override its values")
        add("--model", "-m", help="local Hugging Face folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
        add("--tokenizer", help="tokenizer folder (default: the model's)")
        add("--dtype", help="auto (default), float32, bfloat16 or float16")
        add("--seed", type=int, help="default 0")
        add("--max-model-len", type=int, help="default: the model's context")
        add("--quantization", "-q", choices=["int8", "int4"], help="weight-only quantization of the linear layers")
        add("--quantization-group-size", type=int, help="int4 group size: 32, 64 (default) or 128")
        add("--quantize-lm-head", action=argparse.BooleanOptionalAction,
            help="with --quantization, also the embedding table and LM head, in int8 (default: on)")
        add("--tensor-parallel-size", "--tp", type=int, help="default 1")
        add("--pipeline-parallel-size", "--pp", type=int, help="default 1")
        add("--data-parallel-size", "--dp", type=int, help="default 1")
        add("--distributed-executor-backend", "--executor",
            help="uni, mp, ray or torchrun (default: uni for one worker, else mp)")
        add("--pipeline-layer-partition", type=lambda s: [int(x) for x in s.split(",")],
            help="layers per pipeline stage, comma-separated (default: even split)")
        add("--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS, else a private local one on 127.0.0.1 with token auth)")
        add("--pipeline-placement", choices=["PACK", "SPREAD"],
            help="Ray: keep a replica's stages together (PACK, default) or one node per stage (SPREAD)")
        add("--worker-timeout", dest="worker_timeout_s", type=float,
            help="seconds a worker may take to answer a call or finish a step before it is reported as hung "
                 "(default 300)")
        add("--worker-load-timeout", dest="worker_load_timeout_s", type=float,
            help="seconds placing the workers and loading the model may take (default 1800)")
        add("--enable-expert-parallel", action="store_true",
            help="spread a mixture-of-experts model's experts whole over the tensor-parallel ranks (x data-parallel "
                 "ranks under torchrun) instead of slicing each expert")
        add("--block-size", type=int, help="tokens per KV-cache block (default 16)")
        add("--kv-cache-memory", type=int, help="bytes for the KV cache")
        add("--gpu-memory-utilization", type=float, help="default 0.9")
        add("--enable-prefix-caching", action=argparse.BooleanOptionalAction, help="default on")
        add("--kv-cache-dtype", choices=["auto", "int8"], help="auto (the model's dtype, default) or int8")
        add("--max-num-seqs", type=int, help="default 256")
        add("--max-num-batched-tokens", type=int, help="default 2048")
        add("--long-prefill-token-threshold", type=int, help="default: half of --max-num-batched-tokens")
        r = parser.add_argument_group("replicas: failures and scaling (mp and ray backends)")
        add = functools.partial(r.add_argument, default=argparse.SUPPRESS)
        add("--max-replica-restarts", type=int,
            help="attempts to rebuild a failed replica before giving it up (default 3; 0: never rebuild)")
        add("--replica-restart-backoff", dest="replica_restart_backoff_s", type=float,
            help="seconds before the first rebuild attempt, doubled for each next one (default 1)")
        add("--migration-limit", type=int,
            help="times one request may move to another replica after failures (default 3)")
        add("--no-replica-timeout", dest="no_replica_timeout_s", type=float,
            help="seconds a request may wait while no replica can serve it (default 120)")
        add("--drain-timeout", dest="drain_timeout_s", type=float,
            help="seconds a replica leaving on scale-down finishes its requests before moving them (default 60)")
        add("--health-check-period", dest="health_check_period_s", type=float,
            help="seconds between pings of an idle replica's workers, which find a dead or hung worker before "
                 "a request does (default 5)")
        add("--min-replicas", type=int, help="autoscaling: fewest replicas (default 1)")
        add("--max-replicas", type=int, help="autoscaling: most replicas (default: --min-replicas)")
        add("--initial-replicas", type=int, help="autoscaling: replicas at start (default: --min-replicas)")
        add("--target-ongoing-requests", type=float,
            help="autoscaling: running + queued requests per replica to aim for (default 2)")
        add("--upscale-delay", dest="upscale_delay_s", type=float,
            help="autoscaling: seconds a need for more replicas must last before adding (default 30)")
        add("--downscale-delay", dest="downscale_delay_s", type=float,
            help="autoscaling: seconds a need for fewer replicas must last before removing (default 600)")
        add("--look-back-period", dest="look_back_period_s", type=float,
            help="autoscaling: seconds over which the load is averaged (default 30)")
        add("--upscaling-factor", type=float, help="autoscaling: how far each upscale goes toward the need (default 1)")
        add("--downscaling-factor", type=float,
            help="autoscaling: how far each downscale goes toward the need (default 1)")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, base: dict | None = None) -> EngineArgs:
        """``base`` (a cluster config's engine section: ``cluster_config.engine_args_from_cli``), then the flags
        given on the command line."""
        known = {f.name for f in fields(cls)}
        values = dict(base or {})
        values.update({k: v for k, v in vars(args).items() if k in known and k != "config_file"})
        return cls(**values)
