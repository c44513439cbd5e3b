"""Cluster configs: YAML files that describe a cluster and the layout to run on it (``cluster_configs/``).

    cluster:            # what the cluster offers; the layout is checked against it
      nodes: 2
      gpus_per_node: 8
      cpus_per_node: 64
      gpu: h100-sxm     # optional, for the planner: a device of dist_infer/planner/hardware.py (DEVICES)
      gpu_memory_gb: 80 # optional: overrides the datasheet's memory per GPU (e.g. a MIG slice)
      intra_node_gbps: 3600  # optional: GPU-to-GPU bandwidth per GPU and direction, gigabits/s (default: the GPU's)
      inter_node_gbps: 400   # optional: network bandwidth per node and direction, gigabits/s
    engine:             # engine arguments, the same names as LLM(...) and the CLI flags
      tensor_parallel_size: 8
      pipeline_parallel_size: 2
      distributed_executor_backend: ray
    server:             # optional, for `dist-infer serve`
      port: 8000
      max_waiting: 512
    autoscaling:        # optional: Ray Serve's autoscaling_config names and meanings (engine/autoscaling.py)
      min_replicas: 1
      max_replicas: 4
      target_ongoing_requests: 4

Unknown keys, impossible layouts and bad values are errors naming the key and the file.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields

import yaml

from dist_infer.engine.arg_utils import EngineArgs
from dist_infer.engine.autoscaling import AutoscalingConfig

_CLUSTER_KEYS = {"nodes": int, "gpus_per_node": int, "cpus_per_node": int, "gpu": str, "gpu_memory_gb": float,
                 "intra_node_gbps": float, "inter_node_gbps": float}
_SERVER_KEYS = {"host": str, "port": int, "max_waiting": int, "served_model_name": str, "max_request_bytes": int,
                "ready_timeout": float, "api_key_file": str, "metrics_public": bool, "log_requests": bool,
                "max_prompts_per_request": int, "request_timeout": float, "timeout_keep_alive": float,
                "max_connections": int, "shutdown_timeout": float, "tool_call_parser": str,
                "enable_auto_tool_choice": bool}


@dataclass
class ClusterConfig:
    path: str
    cluster: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)
    server: dict = field(default_factory=dict)
    autoscaling: AutoscalingConfig | None = None  # None: no autoscaling section


def load_cluster_config(path: str) -> ClusterConfig:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ValueError(f"cannot read cluster config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping with cluster / engine / server / autoscaling "
                         f"sections")
    unknown = sorted(set(data) - {"cluster", "engine", "server", "autoscaling"})
    if unknown:
        raise ValueError(f"{path}: unknown section {unknown[0]!r} (expected cluster, engine, server, autoscaling)")
    config = ClusterConfig(path, *(_section(data, name, path) for name in ("cluster", "engine", "server")))
    if "autoscaling" in data:
        config.autoscaling = AutoscalingConfig.from_dict(data["autoscaling"], f"{path}: autoscaling")
    _check_types(config.cluster, _CLUSTER_KEYS, "cluster", path)
    if "gpu" in config.cluster:
        from dist_infer.planner.hardware import device_spec  # lazily: serving needs no datasheets otherwise

        try:
            device_spec(config.cluster["gpu"])
        except ValueError as e:
            raise ValueError(f"{path}: cluster.gpu: {e}") from None
    _check_types(config.server, _SERVER_KEYS, "server", path)
    engine_keys = {f.name for f in fields(EngineArgs)} - {"config_file"}
    for key in config.engine:
        if key not in engine_keys:
            raise ValueError(f"{path}: unknown key engine.{key}")
    _check_layout(config)
    return config


def engine_args_from_cli(args: argparse.Namespace) -> EngineArgs:
    """The engine arguments of a command line: the ``--config`` file's engine and autoscaling sections, then the
    flags given."""
    config_file = getattr(args, "config_file", None)
    base = None
    if config_file:
        config = load_cluster_config(config_file)
        base = dict(config.engine, config_file=config_file)
        if config.autoscaling is not None:  # the policy's fields are engine arguments of the same names
            base.update(dataclasses.asdict(config.autoscaling))
    return EngineArgs.from_cli_args(args, base)


def _section(data: dict, name: str, path: str) -> dict:
    section = data.get(name) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: {name} must be a mapping")
    return section


def _check_types(section: dict, schema: dict, name: str, path: str) -> None:
    for key, value in section.items():
        if key not in schema:
            raise ValueError(f"{path}: unknown key {name}.{key} (expected one of {', '.join(sorted(schema))})")
        kind = schema[key]
        if kind is bool:
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, kind) and not isinstance(value, bool) or (kind is float and isinstance(value, int))
        if not ok:
            raise ValueError(f"{path}: {name}.{key} must be {kind.__name__}, got {value!r}")
        if kind in (int, float) and value < 0:
            raise ValueError(f"{path}: {name}.{key} must not be negative, got {value!r}")


def _check_layout(config: ClusterConfig) -> None:
    """The layout against the cluster's declared size (the model's own limits are checked at start)."""
    engine, cluster, path = config.engine, config.cluster, config.path
    sizes = {}
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        value = engine.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{path}: engine.{key} must be a positive int, got {value!r}")
        sizes[key] = value
    tp = sizes["tensor_parallel_size"]
    world = tp * sizes["pipeline_parallel_size"] * sizes["data_parallel_size"]
    nodes, gpus = cluster.get("nodes", 1), cluster.get("gpus_per_node", 0)
    if gpus:
        if world > nodes * gpus:
            raise ValueError(
                f"{path}: engine asks for tensor x pipeline x data = {world} workers, but cluster offers "
                f"{nodes} node(s) x {gpus} GPU(s) = {nodes * gpus}"
            )
        if tp > gpus:
            raise ValueError(
                f"{path}: engine.tensor_parallel_size={tp} exceeds cluster.gpus_per_node={gpus}; a tensor-parallel "
                f"group must fit inside one node"
            )
