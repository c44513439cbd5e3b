"""``plan()``: every layout a model and a cluster allow, each simulated on a workload, ranked.

1. **Enumerate** tp x pp x dp: tp a size the model's heads and MLP split into (``valid_tensor_parallel_sizes``)
   and no larger than a node; pp one of 1, 2, 3, 4, 6, 8, 12, 16 up to the layer count; tp x pp x dp within the
   cluster's devices (on a CPU-only cluster: ``max_workers`` worker processes). Each is built as a real ``EngineConfig``, so a layout the engine
   would refuse is refused here with the engine's own message.
2. **Memory** per worker (``memory.worker_memory``): layouts whose weights and reserve do not fit, or whose KV
   cache cannot hold the workload's longest request, are out.
3. **Simulate** the rest (``simulator.simulate``) with the cost model: the device's profile where there is one,
   else its datasheet roofline.
4. **Rank**: layouts meeting the SLO first (p99 TTFT and p99 TPOT within the bounds); then, for a closed batch
   (every request there at 0), higher throughput; for arrivals over time, layouts that keep up with the load (within
   5 % of the best throughput) by lower mean TPOT, then those that fall behind.

``PlanError`` says what would fit when nothing does: the memory the weights need against what the cluster has,
with the quantizations or device counts that would fit; or, when no layout meets the SLO, the best p99s reached
and the highest rate at which the best layout meets it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from dist_infer.config import EngineConfig, valid_tensor_parallel_sizes
from dist_infer.kv_cache_groups import cdiv
from dist_infer.planner.hardware import ClusterSpec
from dist_infer.planner.memory import WorkerMemory, worker_memory
from dist_infer.planner.metrics import SimResult
from dist_infer.planner.model_shape import ModelShape
from dist_infer.planner.simulator import simulate
from dist_infer.planner.step_shape import Layout
from dist_infer.planner.workload import Workload

_GB = 1e9


class PlanError(ValueError):
    """Nothing the planner could run meets the request; the message says what would."""


@dataclass(frozen=True)
class SLO:
    ttft_p99: float | None = None  # seconds
    tpot_p99: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> SLO | None:
        """``ttft_p99=0.5,tpot_p99=0.05`` (seconds; ``ms`` suffix for milliseconds)."""
        if not text:
            return None
        values = {}
        for part in text.split(","):
            key, sep, value = part.strip().partition("=")
            if not sep or key not in ("ttft_p99", "tpot_p99"):
                raise ValueError(f"SLO term {part!r} is not ttft_p99=SECONDS or tpot_p99=SECONDS")
            scale = 1e-3 if value.endswith("ms") else 1.0
            try:
                seconds = float(value.removesuffix("ms").removesuffix("s")) * scale
            except ValueError:
                raise ValueError(f"SLO term {part!r}: {value!r} is not a number of seconds") from None
            if not seconds > 0:
                raise ValueError(f"SLO term {part!r} must be positive")
            values[key] = seconds
        return cls(**values)

    def met_by(self, summary: dict) -> bool:
        return ((self.ttft_p99 is None or summary["ttft_p99_s"] <= self.ttft_p99)
                and (self.tpot_p99 is None or not summary["tpot_p99_s"] > self.tpot_p99))

    def __str__(self) -> str:
        terms = [f"{k} <= {v * 1e3:g} ms" for k, v in vars(self).items() if v is not None]
        return ", ".join(terms)


@dataclass
class Candidate:
    layout: Layout
    config: EngineConfig | None = None
    memory: WorkerMemory | None = None
    result: SimResult | None = None
    refused: str | None = None  # why it cannot run

    @property
    def summary(self) -> dict:
        return self.result.summary() if self.result else {}


@dataclass
class Plan:
    model: str | None  # as the user named it (None: the embedded default model)
    workload: Workload
    cost_source: str
    slo: SLO | None
    ranked: list[Candidate]  # runnable layouts, best first
    refused: list[Candidate] = field(default_factory=list)
    num_devices: int = 0

    @property
    def best(self) -> Candidate:
        return self.ranked[0]

    def meets(self, candidate: Candidate) -> bool:
        return self.slo is None or self.slo.met_by(candidate.summary)

    def rows(self) -> list[dict]:
        rows = []
        for rank, c in enumerate(self.ranked, start=1):
            s, m = c.summary, c.memory
            rows.append({
                "rank": rank, "layout": str(c.layout), "tp": c.layout.tp, "pp": c.layout.pp, "dp": c.layout.dp,
                "workers": c.layout.world_size, "throughput_tok_s": s["throughput_tok_s"],
                "ttft_p50_s": s["ttft_p50_s"], "ttft_p99_s": s["ttft_p99_s"], "tpot_mean_s": s["tpot_mean_s"],
                "tpot_p99_s": s["tpot_p99_s"], "goodput_req_s": c.result.goodput(
                    *(self.slo.ttft_p99, self.slo.tpot_p99) if self.slo else (None, None)),
                "meets_slo": self.meets(c), "kv_tokens": m.num_blocks * m.block_size,
                "weights_gb": m.weights / _GB, "kv_cache_gb": m.kv_bytes / _GB, "memory_gb": m.total / _GB,
                "preemptions": s["preemptions"]})
        return rows

    def table(self) -> str:
        head = (f"{'#':>2}  {'layout':<14} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT mean':>9} "
                f"{'TPOT p99':>9} {'goodput':>8} {'KV tokens':>10} {'GB/worker':>9}  SLO")
        lines = [head]
        for row in self.rows():
            lines.append(
                f"{row['rank']:>2}  {row['layout']:<14} {row['throughput_tok_s']:>9.1f} {row['ttft_p50_s'] * 1e3:>7.0f}ms "
                f"{row['ttft_p99_s'] * 1e3:>7.0f}ms {row['tpot_mean_s'] * 1e3:>7.1f}ms {row['tpot_p99_s'] * 1e3:>7.1f}ms "
                f"{row['goodput_req_s']:>6.2f}/s {row['kv_tokens']:>10} {row['memory_gb']:>9.2f}  "
                f"{'yes' if row['meets_slo'] else 'no'}")
        for c in self.refused:
            lines.append(f"    {str(c.layout):<14} not possible: {c.refused}")
        return "\n".join(lines)


def candidate_layouts(model: ModelShape, cluster: ClusterSpec, num_layers: int, max_workers: int,
                      tp_sizes=None, pp_sizes=None, dp_sizes=None) -> list[Layout]:
    """Every (tp, pp, dp) within the cluster, tp fitting one node (GPU clusters)."""
    devices = cluster.num_devices or max_workers
    per_node = cluster.devices_per_node or max_workers
    valid = valid_tensor_parallel_sizes(model.heads, model.kv_heads, model.intermediate)
    tps = [t for t in (tp_sizes or valid) if t <= per_node]
    # Pipeline depths people run (more stages than 16 only add bubbles and hops).
    pps = pp_sizes or [p for p in (1, 2, 3, 4, 6, 8, 12, 16) if p <= min(devices, num_layers)]
    layouts = []
    for tp in tps:
        for pp in pps:
            for dp in dp_sizes or range(1, devices // (tp * pp) + 1):
                if tp * pp * dp <= devices and pp <= num_layers:
                    layouts.append(Layout.even(tp, pp, dp, num_layers))
    return layouts


def _rank_key(candidate: Candidate, slo: SLO | None, closed: bool, best_throughput: float):
    s = candidate.summary
    behind = s["throughput_tok_s"] < 0.95 * best_throughput
    speed = -s["throughput_tok_s"] if closed else s["tpot_mean_s"]
    return (slo is not None and not slo.met_by(s), False if closed else behind, speed, candidate.layout.world_size)


def plan(engine_args: dict, cluster: ClusterSpec, workload: Workload, cost_for, *, slo: SLO | None = None,
         host_memory: float = 0.0, max_workers: int = 12, tp_sizes=None, pp_sizes=None, dp_sizes=None,
         model_name: str | None = None, log=lambda message: None) -> Plan:
    """Plans ``workload`` for the model and engine settings of ``engine_args`` (EngineArgs fields; layout fields
    are filled per candidate) on ``cluster``. ``cost_for(model_shape, dtype_name)``: the cost model.
    ``model_name``: the model as the user named it (None: the embedded default), for the config written."""
    from dist_infer.engine.arg_utils import EngineArgs

    base = EngineArgs(**{**engine_args, "tensor_parallel_size": 1, "pipeline_parallel_size": 1,
                         "data_parallel_size": 1}).create_engine_config()
    mc, sc, cc = base.model_config, base.scheduler_config, base.cache_config
    if workload.max_total_len > mc.max_model_len:
        raise PlanError(f"the workload's longest request ({workload.max_total_len} tokens) exceeds max_model_len="
                        f"{mc.max_model_len}; raise max_model_len or shorten the workload")
    dtype = str(mc.torch_dtype).removeprefix("torch.")
    quant = mc.quant_config.method if mc.quant_config is not None else None
    model = ModelShape.from_hf_config(mc.hf_config, mc.torch_dtype.itemsize, quant, cc.kv_cache_dtype,
                                      name=engine_args.get("model") or "")
    cost = cost_for(model, dtype)
    backend = "mp" if cluster.nodes == 1 else "ray"
    ranked, refused = [], []
    for layout in candidate_layouts(model, cluster, mc.num_layers, max_workers, tp_sizes, pp_sizes, dp_sizes):
        candidate = Candidate(layout)
        try:
            candidate.config = EngineArgs(**{**engine_args, "tensor_parallel_size": layout.tp,
                                             "pipeline_parallel_size": layout.pp, "data_parallel_size": layout.dp,
                                             "distributed_executor_backend": backend}).create_engine_config()
        except ValueError as e:
            candidate.refused = str(e)
            refused.append(candidate)
            continue
        candidate.memory = worker_memory(
            model, layout, device_memory=cluster.memory_per_device or None, host_memory=host_memory,
            gpu_memory_utilization=cc.gpu_memory_utilization, kv_cache_memory=cc.kv_cache_memory,
            cpu_kv_cache_fraction=cc.cpu_kv_cache_fraction, block_size=cc.block_size,
            max_num_seqs=sc.max_num_seqs, max_num_batched_tokens=sc.max_num_batched_tokens,
            max_model_len=mc.max_model_len, longest=workload.max_total_len,
            workers_on_host=layout.world_size if not cluster.devices_per_node else 1)
        need = cdiv(workload.max_total_len, cc.block_size)
        if candidate.memory.num_blocks < need:
            m = candidate.memory
            candidate.refused = (f"weights {m.weights / _GB:.2f} GB + reserve {m.reserve / _GB:.2f} GB per worker "
                                 f"leave room for {m.num_blocks} KV blocks, fewer than the {need} one request needs "
                                 f"(worker capacity {m.capacity / _GB:.2f} GB)")
            refused.append(candidate)
            continue
        if hasattr(cost, "supports") and not cost.supports(layout):
            candidate.refused = f"the profile ({cost.source}) has no measurements for this layout"
            refused.append(candidate)
            continue
        candidate.result = simulate(candidate.config, [candidate.memory.num_blocks], cost, workload)
        log(f"{layout}: {candidate.result.throughput:.1f} tok/s")
        ranked.append(candidate)
    if not ranked:
        raise PlanError(_nothing_fits(model, cluster, refused, host_memory))
    closed = all(item.arrival_s == workload.items[0].arrival_s for item in workload.items)
    best = max(c.summary["throughput_tok_s"] for c in ranked)
    ranked.sort(key=lambda c: _rank_key(c, slo, closed, best))
    result = Plan(model_name, workload, cost.source, slo, ranked, refused, cluster.num_devices)
    if slo is not None and not result.meets(result.best):
        raise PlanError(_slo_unmet(result, cost))
    return result


def _nothing_fits(model: ModelShape, cluster: ClusterSpec, refused: list[Candidate], host_memory: float) -> str:
    reasons = {c.refused for c in refused}
    if not any("KV blocks" in reason for reason in reasons):  # nothing was short of memory: say what was wrong
        return "no layout can be planned: " + "; ".join(sorted(reasons))
    weights = model.total_params() * (model.weight_bits / 8 if model.weight_bits else model.dtype_bytes)
    if cluster.device is not None:
        have = cluster.num_devices * cluster.memory_per_device
        where = f"{cluster.num_devices} x {cluster.device.name} ({have / _GB:.0f} GB)"
        # Weights may take about 70 % of each device (0.9 utilization, room left for a KV cache).
        need_devices = math.ceil(weights / (cluster.memory_per_device * 0.9 * 0.8))
    else:
        have, where, need_devices = host_memory, f"{host_memory / _GB:.0f} GB of RAM", 0
    lines = [f"no layout of this model fits {where}: its weights alone take {weights / _GB:.1f} GB"]
    for bits, name in ((8, "int8"), (4, "int4")):
        quantized = model.total_params() * (bits / 8 + 1 / 16)
        if quantized < 0.8 * have and (model.weight_bits or 99) > bits:
            lines.append(f"with quantization={name} the weights take about {quantized / _GB:.1f} GB and may fit")
    if need_devices:
        lines.append(f"unquantized it needs about {need_devices} x {cluster.device.name} "
                     f"({need_devices * cluster.memory_per_device / _GB:.0f} GB) to leave room for a KV cache")
    if len(reasons) == 1:
        lines.append(f"every layout: {reasons.pop()}")
    return "; ".join(lines)


def _slo_unmet(result: Plan, cost) -> str:
    best_ttft = min(result.ranked, key=lambda c: c.summary["ttft_p99_s"])
    best_tpot = min(result.ranked, key=lambda c: c.summary["tpot_p99_s"])
    message = (f"no layout meets the SLO ({result.slo}): the lowest TTFT p99 is "
               f"{best_ttft.summary['ttft_p99_s'] * 1e3:.0f} ms ({best_ttft.layout}), the lowest TPOT p99 "
               f"{best_tpot.summary['tpot_p99_s'] * 1e3:.1f} ms ({best_tpot.layout})")
    rate = _sustainable_rate(result, cost)
    if rate is not None:
        message += f"; {result.best.layout} meets it at about {rate:.3g} requests/s"
    elif all(item.arrival_s == 0 for item in result.workload.items):
        message += "; a smaller batch, shorter requests or a looser SLO would"
    return message


def _sustainable_rate(result: Plan, cost) -> float | None:
    """The highest arrival rate (halving the workload's, up to 6 times) at which the best layout meets the SLO."""
    items = result.workload.items
    span = items[-1].arrival_s - items[0].arrival_s
    if span <= 0:
        return None
    candidate = result.best
    for halvings in range(1, 7):
        factor = 2 ** halvings
        slowed = Workload(result.workload.name, tuple(dataclasses.replace(i, arrival_s=i.arrival_s * factor)
                                                      for i in items))
        sim = simulate(candidate.config, [candidate.memory.num_blocks], cost, slowed)
        if result.slo.met_by(sim.summary()):
            return (len(items) - 1) / (span * factor)
    return None
