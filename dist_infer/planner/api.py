"""The planner's Python API, what ``dist-infer profile`` and ``dist-infer plan`` call (and notebooks or Ray jobs may):

    from dist_infer.planner import plan_model, profile
    profile(model="my-model/", tp_sizes=[1, 2])              # once per device kind and model shape
    result = plan_model("my-model/", cluster="cluster.yaml", workload="poisson:4:200:512:128",
                        slo="ttft_p99=0.5,tpot_p99=0.05")
    print(result.table()); write_config(result, "best.yaml")
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from dist_infer.planner.hardware import ClusterSpec, cluster_spec_from_dict
from dist_infer.planner.search import Plan, PlanError, SLO, plan
from dist_infer.planner.workload import Workload, parse_workload

DEFAULT_WORKLOAD = "batch:32:128:128"


def local_cluster() -> tuple[ClusterSpec, dict]:
    """This machine as a cluster: its GPUs (none here: a CPU-only node of its usable cores)."""
    cores = len(os.sched_getaffinity(0))
    return ClusterSpec(nodes=1, devices_per_node=0, cpus_per_node=cores), {"nodes": 1, "gpus_per_node": 0,
                                                                          "cpus_per_node": cores}


def load_cluster(cluster) -> tuple[ClusterSpec, dict, dict]:
    """(spec, its ``cluster:`` section, the file's ``engine:`` section) from a config path, a ``cluster:``
    section dict, a ClusterSpec, or None (this machine)."""
    if cluster is None:
        spec, section = local_cluster()
        return spec, section, {}
    if isinstance(cluster, ClusterSpec):
        return cluster, {}, {}
    if isinstance(cluster, dict):
        return cluster_spec_from_dict(cluster, "cluster"), dict(cluster), {}
    from dist_infer.cluster_config import load_cluster_config

    config = load_cluster_config(os.fspath(cluster))
    return cluster_spec_from_dict(config.cluster, config.path), dict(config.cluster), dict(config.engine)


def host_memory_bytes() -> float:
    from dist_infer.worker.memory import available_host_memory

    return float(available_host_memory())


def cost_for(cluster: ClusterSpec, profile_file: str | None = None):
    """``cost_for(model_shape, dtype) -> cost model``: the given profile; else, on a CPU-only cluster, this
    machine's profile of the model; else the cluster GPU's datasheet roofline."""
    from dist_infer.planner.cost_model import ProfiledCost, RooflineCost
    from dist_infer.planner.profiler import device_kind, load_profile, model_shape_key, profile_path

    def build(model, dtype: str, hf_config=None):
        if profile_file is not None:
            data = load_profile(profile_file)
            if hf_config is not None and data.get("model_shape") != model_shape_key(hf_config, dtype,
                                                                                     data.get("quantization")):
                raise PlanError(f"profile {profile_file} was measured for another model shape or dtype (its "
                                f"dtype: {data.get('dtype')}); run `dist-infer profile` on this model")
            return ProfiledCost(data, model)
        if cluster.device is None:
            import torch

            kind = device_kind(torch.device("cpu"))
            path = profile_path(kind, model_shape_key(hf_config, dtype, None)) if hf_config is not None else None
            if path is None or not path.exists():
                raise PlanError(f"no profile of this model on this machine ({kind}); run `dist-infer profile "
                                f"--model ...` first, or plan for a GPU cluster (cluster.gpu) from its datasheet")
            return ProfiledCost(load_profile(path), model, cores=cluster.cpus_per_node or None)
        return RooflineCost(model, cluster, dtype)

    return build


def plan_model(model: str | None = None, cluster=None, workload: str | Workload = DEFAULT_WORKLOAD,
               slo: str | SLO | None = None, profile: str | None = None, tp_sizes=None, pp_sizes=None,
               dp_sizes=None, max_workers: int = 12, seed: int = 0, log=lambda message: None,
               **engine_args) -> Plan:
    """Plans ``model`` (a folder with at least config.json; None: the embedded default) on ``cluster``."""
    from dist_infer.config import ModelConfig
    from dist_infer.model_loader.resolve import resolve_model_path

    spec, _, engine_section = load_cluster(cluster)
    layout_keys = {"tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                   "distributed_executor_backend", "ray_address", "pipeline_placement"}
    args = {k: v for k, v in engine_section.items() if k not in layout_keys}
    args.update(engine_args)
    if model is not None:
        args["model"] = model
    named = args.get("model")  # as the user named it (None: the embedded default), for the config written
    folder = resolve_model_path(named)
    args["model"] = folder
    hf_config = ModelConfig(folder, skip_tokenizer_init=True).hf_config
    if isinstance(workload, str):
        workload = parse_workload(workload, hf_config.vocab_size, seed)
    if isinstance(slo, str):
        slo = SLO.parse(slo)
    build = cost_for(spec, profile)
    return plan(args, spec, workload, lambda shape, dtype: build(shape, dtype, hf_config), slo=slo,
                host_memory=host_memory_bytes(), max_workers=max_workers, tp_sizes=tp_sizes, pp_sizes=pp_sizes,
                dp_sizes=dp_sizes, model_name=None if named in (None, "default") else os.fspath(named), log=log)


def write_config(result: Plan, path: str | Path, cluster_section: dict | None = None) -> Path:
    """The best layout as a cluster config (``serve --config`` runs it as it is), its predicted figures on top."""
    best = result.best
    config = best.config
    parallel, sched = config.parallel_config, config.scheduler_config
    # The model as the user named it (a .gguf file stays one; none: the embedded default), not a converted copy.
    engine = {"model": result.model} if result.model else {}
    engine |= {"tensor_parallel_size": parallel.tensor_parallel_size,
              "pipeline_parallel_size": parallel.pipeline_parallel_size,
              "data_parallel_size": parallel.data_parallel_size,
              "distributed_executor_backend": parallel.distributed_executor_backend,
              "max_num_seqs": sched.max_num_seqs, "max_num_batched_tokens": sched.max_num_batched_tokens,
              "max_model_len": config.model_config.max_model_len, "dtype": config.model_config.dtype
              if isinstance(config.model_config.dtype, str) else str(config.model_config.dtype)}
    if config.model_config.quantization:
        engine["quantization"] = config.model_config.quantization
    if parallel.distributed_executor_backend == "ray":
        engine["ray_address"] = "auto"
    s = best.summary
    header = (f"# Written by `dist-infer plan` ({result.cost_source}); predicted for {result.workload.describe()}:\n"
              f"#   {s['throughput_tok_s']:.1f} output tok/s, TTFT p99 {s['ttft_p99_s'] * 1e3:.0f} ms, "
              f"TPOT mean {s['tpot_mean_s'] * 1e3:.1f} ms, p99 {s['tpot_p99_s'] * 1e3:.1f} ms\n")
    body = {"cluster": cluster_section or {}, "engine": engine}
    path = Path(path)
    path.write_text(header + yaml.safe_dump(body, sort_keys=False))
    return path


def profile(model: str | None = None, tp_sizes=None, thread_counts=None, output: str | None = None,
            quick: bool = False, log=print, **kwargs) -> Path:
    """Profiles ``model`` on this machine (``profiler.profile_model``) and saves the JSON; returns its path.
    Defaults: every tensor-parallel size up to the core count the model allows, and the thread counts the mp
    executor gives a worker (``cores // workers`` for 1..cores workers)."""
    import torch

    from dist_infer.config import ModelConfig, valid_tensor_parallel_sizes
    from dist_infer.model_loader.resolve import resolve_model_path
    from dist_infer.planner.profiler import device_kind, model_shape_key, profile_model, profile_path, save_profile

    folder = resolve_model_path(model)
    mc = ModelConfig(folder, skip_tokenizer_init=True, dtype=kwargs.get("dtype", "auto"))
    cores = len(os.sched_getaffinity(0))
    if tp_sizes is None:
        valid = valid_tensor_parallel_sizes(mc.num_heads, mc.num_kv_heads, mc.hf_config.intermediate_size)
        tp_sizes = [t for t in valid if t <= max(cores + 1, 2)]
    if thread_counts is None:
        thread_counts = sorted({max(1, cores // w) for w in range(1, 4 * cores + 1)})
    data = profile_model(folder, list(tp_sizes), list(thread_counts), quick=quick, log=log, **kwargs)
    path = output or profile_path(device_kind(torch.device(kwargs.get("device", "cpu"))),
                                  model_shape_key(mc.hf_config, data["dtype"], kwargs.get("quantization")))
    return save_profile(data, path)
