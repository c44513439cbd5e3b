"""One data-parallel replica as the engine sees it: its state, its engine core while it has one, its history.

    STARTING --built--> SERVING --worker raised / died / silent--> FAILED --rebuilt--> SERVING
                           |                                          \\--attempts used up--> STOPPED
                           \\--scale-down--> DRAINING --empty (or moved out)--> STOPPED

Only SERVING replicas take new requests. A DRAINING replica finishes what it holds. A FAILED replica's
requests have already moved on; its workers are being torn down and rebuilt in the background.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from dist_infer.engine.engine_core import EngineCore


class ReplicaState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass
class ReplicaEvents:
    """What happened to one replica, for metrics: failures, requests moved away, rebuilds and their seconds."""

    failures: int = 0
    migrations: int = 0
    rebuilds: int = 0
    rebuild_failures: int = 0
    rebuild_seconds: list[float] = field(default_factory=list)
    last_error: str | None = None


@dataclass
class Replica:
    index: int
    state: ReplicaState = ReplicaState.STARTING
    core: EngineCore | None = None
    events: ReplicaEvents = field(default_factory=ReplicaEvents)
    changed_at: float = field(default_factory=time.monotonic)
    drain_deadline: float | None = None
    stop_when_built: bool = False  # scaled down while it was still being built

    def set_state(self, state: ReplicaState) -> None:
        self.state, self.changed_at = state, time.monotonic()

    @property
    def steps(self) -> bool:
        """It runs steps: serving, or draining what it holds."""
        return self.core is not None and self.state in (ReplicaState.SERVING, ReplicaState.DRAINING)
