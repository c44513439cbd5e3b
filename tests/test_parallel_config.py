"""The parallel layout alone: rank layout, layer partitions, and the errors for layouts that cannot work."""

from __future__ import annotations

import pytest

from conftest import save_tiny_model, tiny_llama_config
from dist_infer import LLM
from dist_infer.config import ParallelConfig, valid_tensor_parallel_sizes
from dist_infer.distributed.parallel_state import RankLayout


def test_rank_layout_puts_tensor_parallel_fastest():
    layout = RankLayout(tp=2, pp=2, dp=2)
    assert [layout.coords(r) for r in range(8)] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1),
                                                    (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert layout.tp_ranks(1, 0) == [4, 5] and layout.pp_ranks(0, 1) == [1, 3] and layout.dp_ranks(1, 0) == [2, 6]
    assert layout.replica_ranks(1) == [4, 5, 6, 7] and layout.output_rank(1) == 6


def test_layer_ranges_even_and_explicit():
    assert ParallelConfig(pipeline_parallel_size=3, distributed_executor_backend="mp").layer_ranges(10) == \
        [(0, 4), (4, 7), (7, 10)]
    explicit = ParallelConfig(pipeline_parallel_size=2, pipeline_layer_partition=[7, 3])
    assert explicit.layer_ranges(10) == [(0, 7), (7, 10)]
    with pytest.raises(ValueError, match=r"pipeline_layer_partition=\[7, 3\] sums to 10, but the model has 12 layers"):
        explicit.layer_ranges(12)
    with pytest.raises(ValueError, match="one per pipeline stage"):
        ParallelConfig(pipeline_parallel_size=2, pipeline_layer_partition=[10])


def test_backend_choices():
    assert ParallelConfig().distributed_executor_backend == "uni"
    assert ParallelConfig(tensor_parallel_size=2).distributed_executor_backend == "mp"
    assert ParallelConfig(tensor_parallel_size=2, distributed_executor_backend="external_launcher"
                          ).distributed_executor_backend == "torchrun"
    with pytest.raises(ValueError, match="'uni' runs one worker"):
        ParallelConfig(pipeline_parallel_size=2, distributed_executor_backend="uni")
    with pytest.raises(ValueError, match="distributed_executor_backend='slurm'"):
        ParallelConfig(distributed_executor_backend="slurm")
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive int"):
        ParallelConfig(tensor_parallel_size=0)


def test_valid_tensor_parallel_sizes_for_smollm2_shapes():
    assert valid_tensor_parallel_sizes(9, 3, 1536) == [1, 3]
    assert valid_tensor_parallel_sizes(8, 2, 64) == [1, 2, 4, 8]


def test_impossible_layouts_fail_before_any_worker_starts(tmp_path):
    path = save_tiny_model(tiny_llama_config(num_attention_heads=4, num_key_value_heads=2), tmp_path / "m")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 .* valid sizes: 1, 2, 4"):
        LLM(model=path, skip_tokenizer_init=True, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="pipeline_parallel_size=3 exceeds the model's 2 layers"):
        LLM(model=path, skip_tokenizer_init=True, pipeline_parallel_size=3)
