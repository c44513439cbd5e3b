"""What a step costs on a layout: from a profile measured on the device (``ProfiledCost``), or, for a device never
profiled, from its datasheet (``RooflineCost``). The simulator asks:

* ``stage_seconds(shape, layout, s)``: one rank of pipeline stage ``s`` computing the step (every rank of a stage
  runs it together): its layers, on the first stage the embedding, on the last the logits and sampling, and its
  per-step bookkeeping;
* ``stage_comm_seconds(shape, layout, s)``: its tensor-parallel collectives -- per layer two all-reduces of the
  T x hidden activations (after attention and after the MLP), one more for the vocab-parallel embedding, and an
  all-gather of the sampled rows' logits, as they take with only the stage's own ranks on the host;
* ``comm_stretch(layout, computing)``: how much longer they take while other threads compute on the host;
* ``stage_load(shape, layout)``: where workers share a host's cores, the threads one stage's ranks keep busy while
  computing, the threads per rank, and the cores' efficiency at full occupancy for this step (``events``);
* ``p2p_seconds(shape, layout)``: stage s handing its [2, T, hidden] (hidden, residual) to stage s+1;
* ``engine_seconds(shape, layout)``: the engine thread's own work for a step.
"""

from __future__ import annotations

import os

from dist_infer.kv_cache_groups import cdiv
from dist_infer.planner.comm_profile import CommModel
from dist_infer.planner.fits import evaluate, interpolate
from dist_infer.planner.model_shape import ModelShape
from dist_infer.planner.step_shape import Layout, StepShape, attention_features


def _comm_seconds(comm: CommModel, model: ModelShape, shape: StepShape, layout: Layout, stage: int,
                  floor: float = 0.0) -> float:
    """The stage's collectives; each takes at least ``floor`` (what one costs inside steps: ``comm_in_steps``)."""
    tp = layout.tp
    if tp == 1:
        return 0.0
    activations = shape.num_tokens * model.hidden * model.dtype_bytes
    reduces = 2 * layout.layers[stage] + (stage == 0)
    seconds = reduces * max(floor, comm.time("all_reduce", activations, tp))
    if stage == layout.pp - 1 and shape.num_sampled:
        gathered = shape.num_sampled * cdiv(model.vocab, tp) * model.dtype_bytes
        seconds += max(floor, comm.time("all_gather", gathered, tp))
    return seconds


class ProfiledCost:
    """Costs read from a ``dist-infer profile`` file. Workers of a layout on this host get ``cores // world``
    threads each (the mp executor's rule) and share the host's cores."""

    def __init__(self, profile: dict, model: ModelShape, cores: int | None = None):
        self.profile, self.model = profile, model
        self.source = f"profile {profile.get('device_kind')} ({profile.get('created')})"
        self.on_cpu = profile.get("device", "cpu") == "cpu"
        self.cores = cores or (len(os.sched_getaffinity(0)) if self.on_cpu else None)
        self.host_cores = self.cores if self.on_cpu else None
        self.comm = CommModel.from_profile(profile["comm"]) if profile.get("comm") else None

    def threads(self, layout: Layout) -> int:
        return max(1, self.cores // layout.world_size) if self.on_cpu else 1

    def _fit_key(self, layout: Layout) -> str:
        return f"tp{layout.tp}-t{self.threads(layout)}"

    def worker_fit(self, layout: Layout) -> dict:
        fit = self.profile["workers"].get(self._fit_key(layout))
        if fit is None:
            have = ", ".join(sorted(self.profile["workers"]))
            raise ValueError(f"the profile has no measurements for tp={layout.tp} with {self.threads(layout)} "
                             f"thread(s) per worker (it has {have}); run `dist-infer profile` with --tp {layout.tp}")
        return fit

    def supports(self, layout: Layout) -> bool:
        return self._fit_key(layout) in self.profile["workers"] and (
            self.comm is not None or layout.tp == 1)

    def stage_seconds(self, shape: StepShape, layout: Layout, stage: int) -> float:
        fit = self.worker_fit(layout)
        per_layer = interpolate(fit["dense"], shape.num_tokens) + evaluate(fit["attention"],
                                                                          attention_features(shape.queries))
        seconds = layout.layers[stage] * per_layer + evaluate(
            fit["overhead"], {"step": 1.0, "seqs": shape.num_seqs, "tokens": shape.num_tokens})
        if stage == layout.pp - 1 and shape.num_sampled:
            seconds += interpolate(fit["head"], shape.num_sampled)
        return seconds

    def comm_stretch(self, layout: Layout, computing: float) -> float:
        """How much longer a collective takes while ``computing`` threads besides its group's want the host's
        cores, as measured inside steps (``comm_in_steps``: latency x ((computing + D0) / D0) ** exponent)."""
        info = (self.profile.get("comm_in_steps") or {}).get(str(layout.tp))
        if not info or not self.on_cpu:
            return 1.0
        own = info["threads"]
        return ((computing + own) / own) ** info["exponent"]

    def stage_comm_seconds(self, shape: StepShape, layout: Layout, stage: int) -> float:
        if layout.tp == 1:
            return 0.0
        floor = self.profile.get("comm_in_steps", {}).get(str(layout.tp), {}).get("latency", 0.0)
        return _comm_seconds(self.comm, self.model, shape, layout, stage, floor)

    def stage_load(self, shape: StepShape, layout: Layout) -> tuple[float, int, float]:
        """Efficiency e = a one-thread worker's time alone / its time with every core busy, for this step's dense
        work (from the profile's ``busy_dense``; 1 where it was not measured)."""
        threads = self.threads(layout)
        solo = self.profile["workers"].get(f"tp{layout.tp}-t1", {})
        efficiency = 1.0
        if "busy_dense" in solo:
            T = shape.num_tokens
            efficiency = min(1.0, max(0.25, interpolate(solo["dense"], T) / interpolate(solo["busy_dense"], T)))
        return float(layout.tp * threads), threads, efficiency

    def p2p_seconds(self, shape: StepShape, layout: Layout) -> float:
        if self.comm is None:
            return 0.0
        return self.comm.time("send_recv", 2 * shape.num_tokens * self.model.hidden * self.model.dtype_bytes, 2)

    def engine_seconds(self, shape: StepShape, layout: Layout) -> float:
        coef = self.profile["engine"]["coef"]
        return evaluate(coef, {"step": 1.0, "seqs": shape.num_seqs, "workers": layout.tp * layout.pp - 1})


class RooflineCost:
    """Datasheet costs: each part takes ``max(FLOPs / (peak x GEMM_EFFICIENCY), bytes / (bandwidth x
    MEMORY_EFFICIENCY))``, plus a fixed launch cost per layer (eager PyTorch issues about a dozen kernels per
    layer; no CUDA graphs) and the engine's per-step work. Parts: the layers' linears (weights read once per step,
    2 FLOPs per weight and token), attention (decodes read their K/V; prompt chunks compute 4 d H FLOPs per
    query-key pair), and the LM head. Collectives follow ring algorithms over the cluster's links
    (``CommModel.from_links``): tensor parallelism inside a node, pipeline hops between nodes when a stage
    boundary crosses one."""

    GEMM_EFFICIENCY = 0.7
    MEMORY_EFFICIENCY = 0.8
    LAYER_LAUNCH_S = 100e-6
    ENGINE_STEP_S = 2e-3
    ENGINE_SEQ_S = 20e-6

    def __init__(self, model: ModelShape, cluster, dtype: str):
        self.model, self.cluster, self.dtype = model, cluster, dtype
        device = cluster.device
        if device is None:
            raise ValueError("a roofline needs a GPU datasheet: name the cluster's gpu (cluster.gpu in the config)")
        self.device = device
        flops = device.peak_flops
        self.peak = flops.get(dtype) or flops.get("bfloat16")
        self.source = f"roofline of the {device.name} datasheet"
        self.host_cores = None
        self.intra = CommModel.from_links(cluster.intra_node_bandwidth, cluster.link_latency_s)
        self.inter = CommModel.from_links(cluster.inter_node_bandwidth / max(cluster.devices_per_node, 1),
                                          cluster.inter_node_latency_s)

    def _time(self, flops: float, nbytes: float) -> float:
        return max(flops / (self.peak * self.GEMM_EFFICIENCY),
                   nbytes / (self.device.memory_bandwidth * self.MEMORY_EFFICIENCY))

    def stage_seconds(self, shape: StepShape, layout: Layout, stage: int) -> float:
        m, tp, layers = self.model, layout.tp, layout.layers[stage]
        T = shape.num_tokens
        linear = self._time(2 * T * m.layer_params_per_rank(tp), m.layer_weight_bytes(tp)
                            + 2 * T * m.hidden * m.dtype_bytes)
        kv_element = m.kv_bytes or m.dtype_bytes
        heads = m.heads // tp
        keys = shape.decode_context + shape.prefill_keys
        attention = self._time(4 * m.head_dim * heads * (shape.decode_context + shape.prefill_pairs),
                               keys * 2 * m.kv_heads_per_rank(tp) * m.head_dim * kv_element)
        seconds = layers * (linear + attention + self.LAYER_LAUNCH_S)
        if stage == layout.pp - 1 and shape.num_sampled:
            seconds += self._time(2 * shape.num_sampled * m.hidden * m.vocab / tp, m.vocab_bytes(tp))
        return seconds

    def stage_comm_seconds(self, shape: StepShape, layout: Layout, stage: int) -> float:
        return _comm_seconds(self.intra, self.model, shape, layout, stage)

    def comm_stretch(self, layout: Layout, computing: float) -> float:
        return 1.0  # every worker owns its GPU and its links

    def stage_load(self, shape: StepShape, layout: Layout) -> tuple[float, int, float]:
        return 0.0, 1, 1.0  # every worker owns its GPU

    def p2p_seconds(self, shape: StepShape, layout: Layout) -> float:
        per_node = self.cluster.devices_per_node or 1
        crosses = layout.tp * layout.pp > per_node  # stages spread over nodes: some hops leave the node
        comm = self.inter if crosses else self.intra
        return comm.time("send_recv", 2 * shape.num_tokens * self.model.hidden * self.model.dtype_bytes, 2)

    def engine_seconds(self, shape: StepShape, layout: Layout) -> float:
        return self.ENGINE_STEP_S + self.ENGINE_SEQ_S * shape.num_seqs
