"""How data-parallel replicas fail, recover and scale: a plain dataclass, validated when it is built.

A replica (its tp x pp workers) is the unit that fails. With the ``mp`` and ``ray`` backends a failed
replica's requests move to healthy replicas and continue where they were, the replica is torn down and
rebuilt in the background, and replicas are added and removed while the engine runs (see
``engine.replica_manager``). ``uni`` and ``torchrun`` run every replica in one launch: there a failure
ends the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dist_infer.engine.autoscaling import AutoscalingConfig


@dataclass
class ReplicaConfig:
    """``max_replica_restarts``: attempts to rebuild a failed replica (each after a backoff that starts at
    ``replica_restart_backoff_s`` and doubles, up to a minute) before it is given up; 0 never rebuilds.
    ``migration_limit``: how many times one request may move to another replica; past it the request ends
    with an error. ``no_replica_timeout_s``: how long a request may wait while no replica can take it.
    ``drain_timeout_s``: a replica leaving (scale-down) finishes its requests for up to this long, then moves
    the rest. ``health_check_period_s``: how often a replica with no step in flight has its workers pinged
    (Ray Serve's name), so a worker that died or hung while idle is found before a request lands on it. ``autoscaling``: the replica count's bounds and policy (Ray Serve's names); by default the count
    stays at ``data_parallel_size``."""

    max_replica_restarts: int = 3
    replica_restart_backoff_s: float = 1.0
    migration_limit: int = 3
    no_replica_timeout_s: float = 120.0
    drain_timeout_s: float = 60.0
    health_check_period_s: float = 5.0
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)

    def __post_init__(self) -> None:
        for name in ("max_replica_restarts", "migration_limit"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name in ("replica_restart_backoff_s", "no_replica_timeout_s", "drain_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
        period = self.health_check_period_s
        if isinstance(period, bool) or not isinstance(period, (int, float)) or not period > 0:
            raise ValueError(f"health_check_period_s must be a number of seconds > 0, got {period!r}")
