"""Cluster config files: every shipped one loads, bad ones fail naming the key and the file, flags win."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dist_infer.cluster_config import engine_args_from_cli, load_cluster_config
from dist_infer.engine.arg_utils import EngineArgs
from dist_infer.engine.autoscaling import AutoscalingConfig
from dist_infer.entrypoints.cli import build_parser

CONFIGS = Path(__file__).resolve().parent.parent / "cluster_configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_cluster_config(str(path))
    assert config.engine and config.cluster


def test_the_four_layouts_are_shipped():
    layouts = {p.name: load_cluster_config(str(p)).engine for p in CONFIGS.glob("*.yaml")}
    assert layouts["single-node-8gpu-tp8.yaml"]["tensor_parallel_size"] == 8
    two = layouts["two-node-tp8-pp2.yaml"]
    assert (two["tensor_parallel_size"], two["pipeline_parallel_size"]) == (8, 2)
    assert layouts["dp-replicas.yaml"]["data_parallel_size"] > 1
    assert layouts["local-cpu.yaml"]["distributed_executor_backend"] == "mp"


def test_autoscaling_section_loads():
    config = load_cluster_config(str(CONFIGS / "autoscaling.yaml"))
    assert config.autoscaling == AutoscalingConfig(min_replicas=1, max_replicas=3, target_ongoing_requests=4,
                                                   upscale_delay_s=5, downscale_delay_s=30)
    assert config.autoscaling.enabled and config.autoscaling.initial_replicas == 1
    assert load_cluster_config(str(CONFIGS / "local-cpu.yaml")).autoscaling is None


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text,message", [
    ("engine:\n  tensor_paralel_size: 2\n", "unknown key engine.tensor_paralel_size"),
    ("cluster:\n  gpus: 8\n", "unknown key cluster.gpus"),
    ("clusters: {}\n", "unknown section 'clusters'"),
    ("cluster:\n  nodes: 2\n  gpus_per_node: 8\nengine:\n  tensor_parallel_size: 8\n  pipeline_parallel_size: 4\n",
     "32 workers, but cluster offers 2 node\\(s\\) x 8 GPU\\(s\\) = 16"),
    ("cluster:\n  nodes: 4\n  gpus_per_node: 4\nengine:\n  tensor_parallel_size: 8\n", "engine.tensor_parallel_size=8 exceeds"),
    ("engine:\n  data_parallel_size: zero\n", "engine.data_parallel_size must be a positive int"),
    ("cluster:\n  nodes: many\n", "cluster.nodes must be int"),
    ("server:\n  port: -1\n", "server.port must not be negative"),
    ("- just\n- a list\n", "the top level must be a mapping"),
    ("autoscaling:\n  max_replica: 3\n", "autoscaling: unknown key 'max_replica'"),
    ("autoscaling:\n  min_replicas: 3\n  max_replicas: 2\n",
     "autoscaling: max_replicas \\(2\\) must be >= min_replicas"),
    ("autoscaling:\n  min_replicas: 0\n  max_replicas: 2\n", "autoscaling: min_replicas must be >= 1"),
    ("autoscaling:\n  upscale_delay_s: soon\n", "autoscaling: upscale_delay_s must be a number"),
    ("autoscaling: 3\n", "autoscaling: must be a mapping"),
    ("engine: [\n", "not valid YAML"),
])
def test_bad_configs_name_the_key_and_file(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=message) as err:
        load_cluster_config(path)
    assert path in str(err.value)


def _engine_args(argv):
    return engine_args_from_cli(build_parser().parse_args(argv))


def test_flags_override_the_file_and_the_file_overrides_defaults(tmp_path):
    path = _write(tmp_path, "engine:\n  pipeline_parallel_size: 2\n  max_num_seqs: 7\n  seed: 5\n")
    from_file = _engine_args(["generate", "--config", path, "hi"])
    assert (from_file.pipeline_parallel_size, from_file.max_num_seqs, from_file.seed) == (2, 7, 5)
    overridden = _engine_args(["generate", "--config", path, "--pp", "1", "--seed", "0", "hi"])
    assert (overridden.pipeline_parallel_size, overridden.max_num_seqs, overridden.seed) == (1, 7, 0)
    assert _engine_args(["generate", "hi"]).max_num_seqs == EngineArgs().max_num_seqs


def test_layout_the_model_cannot_take_names_the_file(tmp_path, default_model_path):
    path = _write(tmp_path, "engine:\n  tensor_parallel_size: 2\n")
    result = subprocess.run([sys.executable, "-m", "dist_infer.entrypoints.cli", "generate", "--config", path, "hi"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert path in result.stderr and "tensor_parallel_size=2" in result.stderr and "valid sizes: 1, 3" in result.stderr


@pytest.mark.slow
def test_local_cpu_config_generates_like_one_process(default_model_path):
    question = "What is the capital of France?"
    cli = [sys.executable, "-m", "dist_infer.entrypoints.cli", "generate", "--max-tokens", "16"]
    local = subprocess.run([*cli, "--config", str(CONFIGS / "local-cpu.yaml"), question], capture_output=True,
                           text=True, timeout=600)
    single = subprocess.run([*cli, "--max-model-len", "2048", question], capture_output=True, text=True, timeout=600)
    assert local.returncode == 0 and single.returncode == 0, local.stderr[-2000:]
    assert local.stdout == single.stdout and "Paris" in local.stdout
