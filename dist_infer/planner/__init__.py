"""The parallel planner: predicts the throughput and latency of a tp/pp/dp layout before running it.

``profile`` measures a model's costs on this machine; ``plan_model`` simulates every layout a model and a cluster
allow with the engine's own scheduler and ranks them; ``write_config`` turns the best into a cluster config.
"""

from dist_infer.planner.api import load_cluster, plan_model, profile, write_config
from dist_infer.planner.search import SLO, Plan, PlanError
from dist_infer.planner.workload import fixed_batch, load_trace, parse_workload, poisson

__all__ = ["SLO", "Plan", "PlanError", "fixed_batch", "load_cluster", "load_trace", "parse_workload", "plan_model",
           "poisson", "profile", "write_config"]
