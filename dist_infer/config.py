"""Engine configuration: plain dataclasses, validated when they are built.

Every value a user can set is checked in ``__post_init__`` so that a bad value fails at start with a
message naming the field, never halfway through a step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dist_infer.replica_config import ReplicaConfig

if TYPE_CHECKING:  # torch stays out of the scheduler's imports, which share this module
    import torch

_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def parse_dtype(dtype: str | torch.dtype, checkpoint_dtype: Any) -> torch.dtype:
    """Turns a user's ``dtype`` into a torch dtype; ``"auto"`` takes the checkpoint's (fp32 if it names none)."""
    import torch

    _DTYPES = {name: getattr(torch, target) for name, target in _DTYPE_NAMES.items()}
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype={dtype} is not supported; use one of float32, bfloat16, float16 or 'auto'")
        return dtype
    if not isinstance(dtype, str):
        raise ValueError(f"dtype must be a string or torch.dtype, got {type(dtype).__name__}")
    key = dtype.lower()
    if key == "auto":
        if isinstance(checkpoint_dtype, torch.dtype):
            return checkpoint_dtype if checkpoint_dtype in _DTYPES.values() else torch.float32
        if isinstance(checkpoint_dtype, str) and checkpoint_dtype.lower() in _DTYPES:
            return _DTYPES[checkpoint_dtype.lower()]
        return torch.float32
    if key not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of 'auto', 'float32', 'bfloat16', 'float16'")
    return _DTYPES[key]


@dataclass
class ModelConfig:
    """Which model to run and how.

    ``model`` is a local Hugging Face style folder holding config.json. What a user names (``None`` for the
    embedded default model, a ``.gguf`` file) is turned into such a folder once, before any config is built
    (``model_loader.resolve.resolve_model_path``, called by ``EngineArgs.create_engine_config``): building
    this config, in the driver or in a worker, never converts anything.
    """

    model: str
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    seed: int = 0
    max_model_len: int | None = None
    skip_tokenizer_init: bool = False
    quantization: str | None = None
    quantization_group_size: int = 64
    # The embedding table and LM head in int8 too; None: with quantization, yes.
    quantize_lm_head: bool | None = None

    # Filled in by __post_init__.
    hf_config: Any = field(init=False, repr=False)
    torch_dtype: torch.dtype = field(init=False)
    quant_config: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        from dist_infer.models.registry import check_architecture

        self.model = _model_folder(self.model)
        if self.tokenizer is None:
            self.tokenizer = self.model
        self.hf_config = _load_hf_config(self.model)
        check_architecture(self.hf_config)
        self.torch_dtype = parse_dtype(self.dtype, getattr(self.hf_config, "dtype", None))
        self.quant_config = self._quant_config()
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        derived = int(getattr(self.hf_config, "max_position_embeddings", 0) or 0) or None
        if self.max_model_len is None:
            if derived is None:
                raise ValueError("the checkpoint's config.json has no max_position_embeddings; pass max_model_len")
            self.max_model_len = derived
        elif not isinstance(self.max_model_len, int) or self.max_model_len < 1:
            raise ValueError(f"max_model_len must be a positive int, got {self.max_model_len!r}")
        elif derived is not None and self.max_model_len > derived:
            raise ValueError(
                f"max_model_len={self.max_model_len} is larger than the model's context "
                f"(max_position_embeddings={derived})"
            )

    def _quant_config(self):
        from dataclasses import replace

        from dist_infer.layers.quantization.config import QuantConfig

        if self.quantize_lm_head not in (None, True, False):
            raise ValueError(f"quantize_lm_head must be true, false or unset, got {self.quantize_lm_head!r}")
        stored = QuantConfig.from_checkpoint(self.hf_config)
        if stored is not None:
            if self.quantization not in (None, stored.method):
                raise ValueError(f"quantization={self.quantization!r}, but the checkpoint is already quantized to "
                                 f"{stored.method!r}")
            config = stored
        elif self.quantization is None:
            if self.quantize_lm_head:
                raise ValueError("quantize_lm_head=True needs weight quantization (quantization='int8' or 'int4')")
            return None
        else:
            config = QuantConfig(self.quantization, self.quantization_group_size)
        return replace(config, lm_head=self.quantize_lm_head is not False)

    # Shape facts that every layer and the cache need, read once from the HF config.
    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.hf_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.hf_config, "head_dim", None) or self.hf_config.hidden_size // self.num_heads

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size


def _model_folder(model) -> str:
    if not isinstance(model, (str, os.PathLike)) or not os.path.isdir(model):  # None, a .gguf file, a typo
        raise ValueError(
            f"ModelConfig(model={model!r}) needs an existing model folder; resolve what the user named first "
            f"(dist_infer.model_loader.resolve.resolve_model_path turns None or a .gguf file into a folder, "
            f"as EngineArgs.create_engine_config does)")
    return os.fspath(model)


def _load_hf_config(path: str):
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model folder {path!r} has no config.json")
    return AutoConfig.from_pretrained(path, local_files_only=True)


@dataclass
class CacheConfig:
    """Paged KV cache.

    The pool holds ``num_blocks`` blocks of ``block_size`` tokens; full blocks are shared between requests
    with the same prefix unless ``enable_prefix_caching`` is off. ``kv_cache_dtype="int8"`` stores keys and
    values as int8 with a scale per block and head. Its size comes from ``kv_cache_memory``
    (bytes) when given; otherwise from ``gpu_memory_utilization`` of the GPU's memory after the weights, or,
    on the CPU, ``cpu_kv_cache_fraction`` of the RAM available at start, split evenly among the workers on
    the host.
    """

    block_size: int = 16
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_fraction: float = 0.1
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' (the model's dtype) or 'int8', got {self.kv_cache_dtype!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if self.kv_cache_memory is not None and (not isinstance(self.kv_cache_memory, int) or self.kv_cache_memory < 1):
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if not 0.0 < self.cpu_kv_cache_fraction < 1.0:
            raise ValueError(f"cpu_kv_cache_fraction must be in (0, 1), got {self.cpu_kv_cache_fraction!r}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override!r}")


@dataclass
class SchedulerConfig:
    """How many sequences and tokens one engine step may carry.

    Prompts longer than the step's budget are computed in chunks over several steps. One request's chunk
    takes at most ``long_prefill_token_threshold`` tokens (default: half the budget), so that requests
    arriving during a long prefill still start in the next step.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be a positive int, got {self.max_num_seqs!r}")
        if not isinstance(self.max_num_batched_tokens, int) or self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be a positive int, got {self.max_num_batched_tokens!r}")
        if self.long_prefill_token_threshold is None:
            self.long_prefill_token_threshold = max(1, self.max_num_batched_tokens // 2)
        elif not isinstance(self.long_prefill_token_threshold, int) or self.long_prefill_token_threshold < 1:
            raise ValueError(
                f"long_prefill_token_threshold must be a positive int, got {self.long_prefill_token_threshold!r}"
            )


_BACKENDS = ("uni", "mp", "ray", "torchrun", "external_launcher")
_PLACEMENTS = ("PACK", "SPREAD")


@dataclass
class ParallelConfig:
    """world = data_parallel_size x pipeline_parallel_size x tensor_parallel_size workers.

    ``distributed_executor_backend``: ``uni`` (one process; the default for a single worker), ``mp`` (local
    worker processes; the default otherwise), ``ray`` (one actor per worker in placement groups; joins
    ``ray_address`` or ``$RAY_ADDRESS``, else starts a private local one: loopback only, token auth) or
    ``torchrun`` (alias ``external_launcher``: processes started by torchrun, rank 0 coordinating).
    ``pipeline_layer_partition`` gives each stage's layer count (default: as even as possible, earlier stages taking the remainder).
    ``pipeline_placement`` for Ray: ``PACK`` puts a replica's stages on as few nodes as possible, ``SPREAD``
    puts each stage on a node of its own; each tensor-parallel group always stays inside one node.
    ``worker_timeout_s``: a worker that does not answer a call or finish a step within it is reported as hung.
    ``worker_load_timeout_s``: how long placing the workers (Ray) and loading the model may take; loading a
    large model is slow, not hung. The process groups' own timeout is the larger of the two.
    ``max_batches_in_flight`` caps the micro-batches in the pipeline at once (default: one per stage).
    ``enable_expert_parallel``: a mixture-of-experts model's experts are spread whole over the expert-parallel
    ranks (``expert_parallel_size`` of them) instead of each being sliced over the tensor-parallel ranks.
    """

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

    @property
    def experts_span_replicas(self) -> bool:
        """Experts spread over the workers of several data-parallel replicas: the replicas then share one
        world and step in lockstep."""
        return self.enable_expert_parallel and self.data_parallel_size > 1

    def __post_init__(self) -> None:
        if not isinstance(self.enable_expert_parallel, bool):
            raise ValueError(f"enable_expert_parallel must be True or False, got {self.enable_expert_parallel!r}")
        if self.max_batches_in_flight is None:
            self.max_batches_in_flight = self.pipeline_parallel_size
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "max_batches_in_flight"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        backend = self.distributed_executor_backend
        if backend is not None and backend not in _BACKENDS:
            raise ValueError(f"distributed_executor_backend={backend!r} is not one of {', '.join(_BACKENDS)}")
        if backend == "external_launcher":
            backend = "torchrun"
        if backend is None:
            backend = "uni" if self.world_size == 1 else "mp"
        if backend == "uni" and self.world_size > 1:
            raise ValueError(
                f"distributed_executor_backend='uni' runs one worker, but tensor x pipeline x data parallel "
                f"sizes ask for {self.world_size}; use 'mp', 'ray' or 'torchrun'"
            )
        self.distributed_executor_backend = backend
        if self.pipeline_placement not in _PLACEMENTS:
            raise ValueError(f"pipeline_placement must be one of {', '.join(_PLACEMENTS)}, got {self.pipeline_placement!r}")
        for name in ("worker_timeout_s", "worker_load_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        partition = self.pipeline_layer_partition
        if partition is not None:
            partition = list(partition)
            if len(partition) != self.pipeline_parallel_size or any(
                    not isinstance(n, int) or n < 1 for n in partition):
                raise ValueError(
                    f"pipeline_layer_partition={partition} must hold {self.pipeline_parallel_size} positive layer "
                    f"counts, one per pipeline stage"
                )
            self.pipeline_layer_partition = partition

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size

    @property
    def expert_parallel_size(self) -> int:
        """Ranks one stage's experts are spread over: its tp x dp ranks that share a torch world -- every
        replica's when the experts span the replicas (they then share one world under every executor), else
        one replica's tp ranks."""
        return self.tensor_parallel_size * (self.data_parallel_size if self.experts_span_replicas else 1)

    @property
    def collective_timeout_s(self) -> float:
        """torch.distributed's timeout: a collective may wait on a rank that is still loading."""
        return max(self.worker_timeout_s, self.worker_load_timeout_s)

    def layer_ranges(self, num_layers: int) -> list[tuple[int, int]]:
        """[start, end) of the layers of each pipeline stage."""
        pp = self.pipeline_parallel_size
        counts = self.pipeline_layer_partition
        if counts is None:
            counts = [num_layers // pp + (1 if s < num_layers % pp else 0) for s in range(pp)]
        elif sum(counts) != num_layers:
            raise ValueError(
                f"pipeline_layer_partition={counts} sums to {sum(counts)}, but the model has {num_layers} layers"
            )
        ranges, start = [], 0
        for n in counts:
            ranges.append((start, start + n))
            start += n
        return ranges


def valid_tensor_parallel_sizes(num_heads: int, num_kv_heads: int, intermediate_size: int) -> list[int]:
    """Sizes that split the query heads and the MLP evenly and either split or replicate the K/V heads."""
    return [t for t in range(1, num_heads + 1)
            if num_heads % t == 0 and intermediate_size % t == 0 and (num_kv_heads % t == 0 or t % num_kv_heads == 0)]


@dataclass
class EngineConfig:
    """Everything one engine needs, built and validated together."""

    model_config: ModelConfig
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    replica_config: ReplicaConfig = field(default_factory=ReplicaConfig)

    def __post_init__(self) -> None:
        """Checks the parallel layout against the model before any worker starts."""
        model, parallel = self.model_config, self.parallel_config
        autoscaling = self.replica_config.autoscaling
        if autoscaling.max_replicas > 1 and parallel.distributed_executor_backend not in ("mp", "ray") and (
                autoscaling.max_replicas != autoscaling.min_replicas):
            raise ValueError(
                f"autoscaling (max_replicas={autoscaling.max_replicas}) needs replicas that start and stop on their "
                f"own: distributed_executor_backend 'mp' or 'ray', not {parallel.distributed_executor_backend!r}")
        if parallel.experts_span_replicas and autoscaling.enabled:
            raise ValueError(
                f"autoscaling cannot add or remove replicas whose experts are spread over each other's workers "
                f"(enable_expert_parallel with data_parallel_size={parallel.data_parallel_size}): they share one "
                f"world; turn autoscaling off or expert parallelism across replicas off")
        from dist_infer.models.moe_config import check_expert_layout, has_dense_mlp, moe_sizes

        tp = parallel.tensor_parallel_size
        # A mixture-of-experts model without dense layers has no MLP of intermediate_size to slice.
        dense = moe_sizes(model.hf_config) is None or has_dense_mlp(model.hf_config)
        intermediate = model.hf_config.intermediate_size if dense else 0  # 0 divides by every size
        valid = valid_tensor_parallel_sizes(model.num_heads, model.num_kv_heads, intermediate)
        if tp not in valid:
            raise ValueError(
                f"tensor_parallel_size={tp} does not fit this model (num_attention_heads={model.num_heads}, "
                f"num_key_value_heads={model.num_kv_heads}{f', intermediate_size={intermediate}' if dense else ''}); "
                f"valid sizes: {', '.join(map(str, valid))}"
            )
        check_expert_layout(model.hf_config, tp, parallel.expert_parallel_size, parallel.enable_expert_parallel, valid)
        if parallel.pipeline_parallel_size > model.num_layers:
            raise ValueError(
                f"pipeline_parallel_size={parallel.pipeline_parallel_size} exceeds the model's "
                f"{model.num_layers} layers"
            )
        parallel.layer_ranges(model.num_layers)  # raises on a partition that does not add up
        self._check_quantization_groups(tp)

    def _check_quantization_groups(self, tp: int) -> None:
        """int4 groups run along the input features; a row-parallel layer (o_proj, down_proj) splits those over
        the ranks, so each rank's slice must hold whole groups (at tp=1 a short last group is fine)."""
        quant, model = self.model_config.quant_config, self.model_config
        if quant is None or quant.method != "int4" or tp == 1:
            return
        inputs = {"o_proj": model.num_heads * model.head_dim, "down_proj": model.hf_config.intermediate_size}
        for name, size in inputs.items():
            if (size // tp) % quant.group_size:
                raise ValueError(
                    f"int4 groups of {quant.group_size} input features do not fit {name}: with "
                    f"tensor_parallel_size={tp} each rank holds {size // tp} of its {size} input features; "
                    f"choose a quantization_group_size that divides {size // tp}"
                )
