"""The parallel layout alone: rank layout, layer partitions, and the errors for layouts that cannot work."""

from __future__ import annotations

import pytest

from conftest import save_tiny_model, tiny_llama_config
from dist_infer import LLM
from dist_infer.config import ParallelConfig, valid_tensor_parallel_sizes
from dist_infer.distributed.layout import RankLayout


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


def test_load_and_step_timeouts_are_separate_and_validated():
    config = ParallelConfig(worker_timeout_s=5, worker_load_timeout_s=600)
    assert (config.worker_timeout_s, config.worker_load_timeout_s) == (5, 600)
    assert config.collective_timeout_s == 600  # a collective may wait on a rank that is still loading
    assert ParallelConfig(worker_timeout_s=900, worker_load_timeout_s=60).collective_timeout_s == 900
    defaults = ParallelConfig()
    assert (defaults.worker_timeout_s, defaults.worker_load_timeout_s) == (300.0, 1800.0)
    for name, value in [("worker_timeout_s", 0), ("worker_load_timeout_s", -1), ("worker_load_timeout_s", "10"),
                        ("worker_timeout_s", True)]:
        with pytest.raises(ValueError, match=f"{name} must be a positive number of seconds"):
            ParallelConfig(**{name: value})


def test_timeout_flags_reach_the_parallel_config():
    from dist_infer.cluster_config import engine_args_from_cli
    from dist_infer.entrypoints.cli import build_parser

    args = engine_args_from_cli(build_parser().parse_args(
        ["generate", "--worker-timeout", "7", "--worker-load-timeout", "70", "hi"]))
    assert (args.worker_timeout_s, args.worker_load_timeout_s) == (7.0, 70.0)


def test_a_slow_load_under_a_short_step_timeout_is_not_a_hang():
    """Loading waits for ``worker_load_timeout_s``; calls and steps for ``worker_timeout_s``."""
    import threading
    from concurrent.futures import Future
    from types import SimpleNamespace

    from dist_infer.executor.base import WorkerError
    from dist_infer.executor.distributed import DistributedExecutor, WorkerHandle

    class Handle(WorkerHandle):
        def call(self, method, args=(), kwargs=None):
            return Future()  # never answers

        def shutdown(self, graceful=True):
            pass

    def executor(step_s: float, load_s: float) -> DistributedExecutor:
        ex = DistributedExecutor.__new__(DistributedExecutor)
        ex.config = SimpleNamespace(parallel_config=ParallelConfig(worker_timeout_s=step_s, worker_load_timeout_s=load_s))
        ex.handles, ex.ranks = {0: Handle(0, (0, 0, 0))}, [0]
        return ex

    def slow_load(seconds: float) -> Future:
        future: Future = Future()
        threading.Timer(seconds, future.set_result, ("loaded",)).start()
        return future

    executor(step_s=0.05, load_s=30).wait_loaded([slow_load(0.5)])  # no error: loading is slow, not hung
    with pytest.raises(WorkerError, match=r"failed in load: no answer within 0s"):
        executor(step_s=30, load_s=0.05).wait_loaded([slow_load(5)])
    with pytest.raises(WorkerError, match=r"failed in ping: no answer within 0s"):
        executor(step_s=0.05, load_s=30).collective_rpc("ping")
