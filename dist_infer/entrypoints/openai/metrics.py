"""Prometheus metrics for ``/metrics``, in a registry of the server's own.

Counted as requests finish: ``dist_infer_requests_total{model,endpoint,status,key}`` (``endpoint`` is the route
template or ``unmatched``, ``key`` the API key's name, ``none`` on a server without keys and
``unauthenticated`` for requests without a valid one), prompt and generated tokens, histograms of time to first
token, inter-token latency and end-to-end latency, and ``dist_infer_ready_checks_total{model,result}`` (``ok`` /
``fail``) for each ``/ready`` that ran its checks.

Read from the engine at each scrape: ``dist_infer_replica_up{model,replica}`` (1 while the replica serves or
drains and the engine answers its stats within the scrape budget, else 0), ``dist_infer_replica_state{model,
replica,state}`` (1 for its state: starting, serving, draining, failed, stopped), per replica its failures,
the requests that moved away from it, its rebuilds, failed rebuild attempts and the seconds rebuilds took
(``dist_infer_replica_rebuild_seconds`` sum and count), waiting and running requests, KV-cache use and
prefix-cache hit rate per replica, per pipeline stage the time its workers spent computing and their idle (bubble) fraction,
and ``dist_infer_worker_uptime_seconds{model,replica,stage,rank}`` (it restarts from 0 with its worker, so
``resets()`` counts restarts). A dead engine still yields the server's own counters and ``replica_up`` 0, so the
scrape succeeds and the alert fires.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from dist_infer.outputs import RequestOutput

logger = logging.getLogger("dist_infer.server")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    def __init__(self, engine, model_name: str, num_replicas: int = 1, scrape_timeout_s: float = 5.0):
        self.engine = engine
        self.registry = CollectorRegistry()
        labels = ["model"]
        self.requests = Counter("dist_infer_requests", "Requests answered, by route template, HTTP status and "
                                "API key name", labels + ["endpoint", "status", "key"], registry=self.registry)
        self.ready_checks = Counter("dist_infer_ready_checks", "/ready checks run, by result (ok or fail)",
                                    labels + ["result"], registry=self.registry)
        self.prompt_tokens = Counter("dist_infer_prompt_tokens", "Prompt tokens of finished requests", labels,
                                     registry=self.registry)
        self.generation_tokens = Counter("dist_infer_generation_tokens", "Tokens generated", labels,
                                         registry=self.registry)
        self.ttft = Histogram("dist_infer_time_to_first_token_seconds", "Time to first token", labels,
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("dist_infer_inter_token_latency_seconds", "Time between generated tokens", labels,
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("dist_infer_e2e_request_latency_seconds", "Arrival to last token", labels,
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.model_name = model_name
        self._engine_collector = _EngineCollector(engine, model_name, num_replicas, scrape_timeout_s)
        self.registry.register(self._engine_collector)

    def count_response(self, endpoint: str, status: int, key: str = "none") -> None:
        self.requests.labels(self.model_name, endpoint, str(status), key).inc()

    def count_ready(self, ok: bool) -> None:
        self.ready_checks.labels(self.model_name, "ok" if ok else "fail").inc()

    def observe_request(self, output: RequestOutput, num_generated: int) -> None:
        """One engine request finished, having generated ``num_generated`` tokens."""
        m, name = output.metrics, self.model_name
        self.prompt_tokens.labels(name).inc(len(output.prompt_token_ids))
        self.generation_tokens.labels(name).inc(num_generated)
        if m is None:
            return
        if m.first_token_time is not None:
            self.ttft.labels(name).observe(m.time_to_first_token)
        for gap in m.inter_token_latencies:
            self.itl.labels(name).observe(gap)
        if m.finished_time is not None:
            self.e2e.labels(name).observe(m.finished_time - m.arrival_time)

    async def render(self) -> bytes:
        """The exposition text, with engine state read (on the engine's own thread) just before. Never raises
        for an engine that is dead or does not answer: that is what ``dist_infer_replica_up`` 0 says."""
        await self._engine_collector.refresh()
        return generate_latest(self.registry)


class _EngineCollector:
    """Engine state read at scrape time."""

    def __init__(self, engine, model_name: str, num_replicas: int, timeout_s: float):
        self.engine, self.model_name, self.timeout_s = engine, model_name, timeout_s
        self.num_replicas = max(1, num_replicas)
        self.up = False
        self.replicas: list = []
        self.timings: list[dict] = []
        self._timings_ok = True
        self._reported_down = False

    async def refresh(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        try:
            self.replicas = await asyncio.wait_for(self.engine.replica_stats(), self.timeout_s)
        except Exception as e:  # dead, shut down, or stuck in a step: every replica is down for Prometheus
            if not self._reported_down:  # once per outage, not once per scrape
                self._reported_down = True
                logger.warning("the engine does not answer its stats (%s); dist_infer_replica_up is 0 (GET /ready "
                               "names the cause)", type(e).__name__)
            self.up, self.replicas, self.timings = False, [], []
            return
        self.up, self._reported_down = True, False
        try:
            self.timings = await asyncio.wait_for(self.engine.worker_timings(), max(0.1, deadline - time.monotonic()))
            self._timings_ok = True
        except Exception as e:  # a dead worker: /ready reports it; the other metrics stay available
            if self._timings_ok:
                logger.warning("worker timings unavailable (%s); GET /ready names the cause", type(e).__name__)
            self._timings_ok, self.timings = False, []

    def describe(self):
        return []

    def collect(self):
        labels = ["model", "replica"]
        gauges = {
            "num_requests_waiting": ("Requests waiting to start", "num_waiting"),
            "num_requests_running": ("Requests running", "num_running"),
            "kv_cache_usage_ratio": ("Fraction of KV-cache blocks in use", "kv_cache_usage"),
            "prefix_cache_hit_rate": ("Prompt tokens found in the prefix cache / looked up", "prefix_cache_hit_rate"),
        }
        families = {k: GaugeMetricFamily(f"dist_infer_{k}", doc, labels=labels) for k, (doc, _) in gauges.items()}
        up = GaugeMetricFamily("dist_infer_replica_up", "1 while the replica serves (or drains) and the engine "
                               "answers its stats, else 0", labels=labels)
        reports = self.replicas if self.up else []
        steps = {r["index"] for r in reports if r["state"] in ("serving", "draining")}
        for replica in sorted(set(range(self.num_replicas)) | {r["index"] for r in reports}):
            up.add_metric([self.model_name, str(replica)], 1.0 if replica in steps else 0.0)
        yield up
        yield from self._replica_events(reports)
        counters = {
            "replica_requests": ("Requests routed to each replica", "requests_added"),
            "replica_generation_tokens": ("Tokens generated, per replica", "generation_tokens"),
            "prefix_cache_hit_tokens": ("Prompt tokens served from the prefix cache, per replica", "prefix_cache_hits"),
            "preemptions": ("Requests preempted, per replica", "num_preemptions"),
        }
        totals = {k: CounterMetricFamily(f"dist_infer_{k}", doc, labels=labels) for k, (doc, _) in counters.items()}
        for report in reports:
            stats = report["stats"]
            if stats is None:
                continue
            key = [self.model_name, str(report["index"])]
            for name, (_, attr) in gauges.items():
                families[name].add_metric(key, float(getattr(stats, attr)))
            for name, (_, attr) in counters.items():
                totals[name].add_metric(key, getattr(stats, attr))
        yield from families.values()
        yield from totals.values()
        yield from self._stage_metrics()

    def _replica_events(self, reports: list[dict]):
        labels = ["model", "replica"]
        state = GaugeMetricFamily("dist_infer_replica_state", "1 for the replica's current state",
                                  labels=labels + ["state"])
        counts = {
            "failures": CounterMetricFamily("dist_infer_replica_failures", "Times the replica failed (a worker "
                                            "raised, died or hung)", labels=labels),
            "migrations": CounterMetricFamily("dist_infer_request_migrations", "Requests moved away from the "
                                              "replica (after its failure, or at the end of a drain)", labels=labels),
            "rebuilds": CounterMetricFamily("dist_infer_replica_rebuilds", "Times the replica was rebuilt after a "
                                            "failure", labels=labels),
            "rebuild_failures": CounterMetricFamily("dist_infer_replica_rebuild_failures", "Build attempts of the "
                                                    "replica that failed", labels=labels),
        }
        seconds = SummaryMetricFamily("dist_infer_replica_rebuild_seconds", "Seconds from a replica's failure (or "
                                      "scale-up) until it served again", labels=labels)
        for report in reports:
            key, events = [self.model_name, str(report["index"])], report["events"]
            state.add_metric(key + [report["state"]], 1.0)
            for name, family in counts.items():
                family.add_metric(key, getattr(events, name))
            seconds.add_metric(key, len(events.rebuild_seconds), sum(events.rebuild_seconds))
        yield state
        yield from counts.values()
        yield seconds

    def _stage_metrics(self):
        stage_labels = ["model", "replica", "stage"]
        busy = CounterMetricFamily("dist_infer_stage_compute_seconds", "Time a stage's workers spent computing",
                                   labels=stage_labels)
        idle = GaugeMetricFamily("dist_infer_stage_idle_ratio",
                                 "Fraction of time a stage had no step to compute (pipeline bubble or no work)",
                                 labels=stage_labels)
        uptime_family = GaugeMetricFamily("dist_infer_worker_uptime_seconds",
                                          "Seconds since the worker became ready (back to 0 when it restarts)",
                                          labels=stage_labels + ["rank"])
        for t in sorted(self.timings, key=lambda t: t["rank"]):
            uptime_family.add_metric([self.model_name, str(t["dp_rank"]), str(t["pp_rank"]), str(t["rank"])],
                                     float(t["uptime_seconds"]))
        stages: dict[tuple[int, int], list[dict]] = {}
        for t in self.timings:
            stages.setdefault((t["dp_rank"], t["pp_rank"]), []).append(t)
        for (replica, stage), members in sorted(stages.items()):
            compute = max(t["compute_seconds"] for t in members)
            uptime = max(t["uptime_seconds"] for t in members)
            key = [self.model_name, str(replica), str(stage)]
            busy.add_metric(key, compute)
            idle.add_metric(key, max(0.0, 1.0 - compute / uptime) if uptime > 0 else 0.0)
        yield busy
        yield idle
        yield uptime_family
