"""How many data-parallel replicas to run, from the load (plain Python; no engine code, no clock of its own).

The settings are Ray Serve's ``autoscaling_config``, same names, same meanings:

    min_replicas / max_replicas   the bounds (Ray allows min 0; dist-infer keeps at least one replica)
    initial_replicas              replicas at start (None: min_replicas; resolved when the config is built)
    target_ongoing_requests       the ongoing requests (running + queued) wanted per replica
    upscale_delay_s               how long the wish to scale up must hold before it is acted on
    downscale_delay_s             the same for scaling down (long: restarting a replica is expensive)
    look_back_period_s            the window the load is averaged over
    metrics_interval_s            how often the caller samples the load and calls ``decide``
    upscaling_factor / downscaling_factor   Ray's smoothing gains (None: 1, no smoothing)

The math of one ``AutoscalingPolicy.decide(now, n, ongoing)`` call, with ``n`` the current replica count:

    avg     = mean of the ongoing-request totals sampled in (now - look_back_period_s, now]
    raw     = avg / target_ongoing_requests                 replicas needed for exactly the target per replica
    f       = upscaling_factor if raw >= n else downscaling_factor
    desired = ceil(n + f * (raw - n))                       with f = 1: ceil(raw)
              ... minus 1 when smoothing alone holds it at n although ceil(raw) < n (Ray's rule, so a small
              downscaling_factor still lets the count come down)
    desired = clamp(desired, min_replicas, max_replicas)

``decide`` returns ``desired`` once ``desired > n`` has held in every call for ``upscale_delay_s`` (``desired
< n``: ``downscale_delay_s``), and ``n`` otherwise; a change of direction or a call with ``desired == n``
restarts the wait, and so does a returned decision (the next change waits its own delay, as in Ray). A count
outside [min_replicas, max_replicas] is brought back into range at once: the bounds are limits, not a signal.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, fields

_INT_FIELDS = ("min_replicas", "max_replicas", "initial_replicas")
_OPTIONAL_FIELDS = ("initial_replicas", "upscaling_factor", "downscaling_factor")
_EPSILON = 1e-9  # float noise in avg / target must not buy a whole replica (4.000000001 -> 5)


@dataclass
class AutoscalingConfig:
    """Ray Serve's ``autoscaling_config`` fields and defaults (``min_replicas`` must be >= 1 here).
    ``initial_replicas=None`` becomes ``min_replicas`` when built, so it is always an int afterwards."""

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_period_s: float = 30.0
    metrics_interval_s: float = 10.0
    upscaling_factor: float | None = None
    downscaling_factor: float | None = None

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in _OPTIONAL_FIELDS:
                continue
            if f.name in _INT_FIELDS:
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError(f"{f.name} must be an int, got {value!r}")
            else:
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise ValueError(f"{f.name} must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise ValueError(f"{f.name} must be finite, got {value!r}")
                setattr(self, f.name, float(value))
        if self.min_replicas < 1:
            raise ValueError(f"min_replicas must be >= 1, got {self.min_replicas} (Ray Serve allows 0, but "
                             f"dist-infer always keeps at least one replica to take requests)")
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        if self.initial_replicas is None:  # Ray's meaning; resolved here so readers always see an int
            self.initial_replicas = self.min_replicas
        if not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must lie within min_replicas "
                             f"({self.min_replicas}) and max_replicas ({self.max_replicas})")
        for name in ("target_ongoing_requests", "look_back_period_s", "metrics_interval_s",
                     "upscaling_factor", "downscaling_factor"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    @property
    def enabled(self) -> bool:
        """Whether there is anything to decide: max_replicas > min_replicas."""
        return self.max_replicas > self.min_replicas

    @classmethod
    def from_dict(cls, data: dict | None, where: str) -> AutoscalingConfig:
        """A config from a parsed mapping (a YAML section); ``where`` (e.g. ``"cluster.yaml: autoscaling"``)
        starts every error message, which also names the key. An empty section (None) means the defaults."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{where}: must be a mapping of autoscaling settings, got {data!r}")
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                raise ValueError(f"{where}: unknown key {key!r} (expected one of {', '.join(known)})")
        try:
            return cls(**data)
        except ValueError as e:  # the message names the field; add where it came from
            raise ValueError(f"{where}: {e}") from None


class AutoscalingPolicy:
    """Decides the replica count from load samples (see the module docstring for the math).

    Deterministic: its only clock is the ``now`` passed to ``decide`` (any monotonic seconds), so a fake
    clock drives it in tests exactly as ``time.monotonic()`` does in the engine.
    """

    def __init__(self, config: AutoscalingConfig):
        self.config = config
        self._samples: deque[tuple[float, float]] = deque()  # (time, total ongoing requests), oldest first
        self._direction = 0  # +1: wanting more replicas since self._since; -1: fewer; 0: content
        self._since = 0.0

    def desired_replicas(self, num_replicas: int, avg_ongoing: float) -> int:
        """The count the average load asks for now, before any delay: Ray's formula, clamped to the bounds."""
        c = self.config
        raw = avg_ongoing / c.target_ongoing_requests
        factor = (c.upscaling_factor if raw >= num_replicas else c.downscaling_factor) or 1.0
        desired = math.ceil(num_replicas + factor * (raw - num_replicas) - _EPSILON)
        # Smoothing must not pin the count: when the load alone would shrink it, shrink by at least one.
        if math.ceil(raw - _EPSILON) < num_replicas and desired == num_replicas:
            desired -= 1
        return min(max(desired, c.min_replicas), c.max_replicas)

    def average_ongoing(self, now: float) -> float:
        """Mean of the samples in (now - look_back_period_s, now]; 0 with none."""
        horizon = now - self.config.look_back_period_s
        # Older samples can never count again: now only grows.
        while self._samples and self._samples[0][0] <= horizon:
            self._samples.popleft()
        if not self._samples:
            return 0.0
        return sum(value for _, value in self._samples) / len(self._samples)

    def decide(self, now: float, num_replicas: int, ongoing_requests: float) -> int:
        """Records ``ongoing_requests`` (running + queued, summed over every replica) seen at ``now`` and
        returns the replica count to run: ``num_replicas`` unless a change has been wanted long enough.

        ``num_replicas`` is the count the caller is aiming at (replicas still starting included), so the
        load of a slow start does not ask for the same replicas twice.
        """
        if not isinstance(num_replicas, int) or isinstance(num_replicas, bool) or num_replicas < 0:
            raise ValueError(f"num_replicas must be an int >= 0, got {num_replicas!r}")
        if not ongoing_requests >= 0:  # also rejects NaN
            raise ValueError(f"ongoing_requests must be >= 0, got {ongoing_requests!r}")
        if self._samples and now < self._samples[-1][0]:
            raise ValueError(f"time went backwards: now={now} after {self._samples[-1][0]} (use a monotonic clock)")
        c = self.config
        self._samples.append((float(now), float(ongoing_requests)))
        avg = self.average_ongoing(now)
        in_range = min(max(num_replicas, c.min_replicas), c.max_replicas)
        if in_range != num_replicas:
            self._direction = 0
            return in_range
        desired = self.desired_replicas(num_replicas, avg)
        direction = (desired > num_replicas) - (desired < num_replicas)
        if direction != self._direction:  # a new wish (or none): its wait starts now
            self._direction, self._since = direction, now
        if direction == 0:
            return num_replicas
        delay = c.upscale_delay_s if direction > 0 else c.downscale_delay_s
        if now - self._since < delay:
            return num_replicas
        self._direction = 0  # acted on; a further change waits its own delay
        return desired
