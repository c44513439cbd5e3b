"""EngineArgs into configs: each sub-config takes its fields by name, and the model is resolved (a GGUF file
converted) once, before any config is built -- never again when a config is rebuilt or travels to a worker."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from dist_infer.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig
from dist_infer.engine.arg_utils import EngineArgs
from dist_infer.engine.autoscaling import AutoscalingConfig
from dist_infer.replica_config import ReplicaConfig

SUB_CONFIGS = (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig, ReplicaConfig)
# The autoscaling policy's fields are engine arguments too (Ray Serve's names).
AUTOSCALING_ARGS = {f.name for f in dataclasses.fields(AutoscalingConfig)}


def test_every_engine_argument_lands_in_exactly_one_sub_config():
    taken = [f.name for cls in SUB_CONFIGS for f in dataclasses.fields(cls) if f.init and f.name != "autoscaling"]
    taken += sorted(AUTOSCALING_ARGS & {f.name for f in dataclasses.fields(AutoscalingConfig)})
    assert len(taken) == len(set(taken)), "a field name is shared by two sub-configs"
    arguments = {f.name for f in dataclasses.fields(EngineArgs)} - {"config_file"}
    assert arguments == set(taken)


def test_sub_configs_get_the_values_by_name(default_model_path):
    config = EngineArgs(model=default_model_path, skip_tokenizer_init=True, seed=3, max_model_len=512,
                        block_size=8, kv_cache_dtype="int8", max_num_seqs=5, long_prefill_token_threshold=64,
                        pipeline_placement="SPREAD", worker_timeout_s=9, worker_load_timeout_s=99,
                        max_batches_in_flight=1).create_engine_config()
    assert (config.model_config.seed, config.model_config.max_model_len) == (3, 512)
    assert (config.cache_config.block_size, config.cache_config.kv_cache_dtype) == (8, "int8")
    assert (config.scheduler_config.max_num_seqs, config.scheduler_config.long_prefill_token_threshold) == (5, 64)
    parallel = config.parallel_config
    assert (parallel.pipeline_placement, parallel.worker_timeout_s, parallel.worker_load_timeout_s,
            parallel.max_batches_in_flight) == ("SPREAD", 9, 99, 1)


def test_model_config_takes_only_a_resolved_folder(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    for model in (None, str(gguf), str(tmp_path / "missing")):
        with pytest.raises(ValueError, match="needs an existing model folder.*resolve_model_path"):
            ModelConfig(model)


def test_the_model_is_converted_once_not_per_config_copy(default_model_path, monkeypatch):
    from dist_infer.model_loader import gguf_convert

    calls = []
    real = gguf_convert.convert_gguf

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf_convert, "convert_gguf", counting)
    config = EngineArgs(skip_tokenizer_init=True).create_engine_config()  # the embedded default model's GGUF
    assert len(calls) == 1 and config.model_config.model == default_model_path
    # What a worker receives (pickled), and a config rebuilt from it, convert nothing.
    received = pickle.loads(pickle.dumps(config))
    dataclasses.replace(received.model_config)
    assert len(calls) == 1
