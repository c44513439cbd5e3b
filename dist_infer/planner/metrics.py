"""Serving metrics of one run, simulated or measured, defined once so that the two compare like for like.

Per request: TTFT = first token - arrival; TPOT = (finish - first token) / (outputs - 1), for requests with more
than one output token. Throughput = output tokens / (last finish - first arrival). Goodput = requests per second
that met every SLO given (``ttft`` and ``tpot`` bounds in seconds, at the request level, as DistServe defines it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class RequestTimes:
    arrival: float
    prompt_len: int
    output_len: int
    first_token: float | None = None
    finish: float | None = None
    generated: int = 0
    cached_tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.generated < 2:
            return None
        return (self.finish - self.first_token) / (self.generated - 1)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between ranks; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass
class SimResult:
    layout: str
    requests: list[RequestTimes]
    num_steps: int = 0
    num_preemptions: int = 0
    prefix_cache_hits: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return max(r.finish for r in self.requests) - min(r.arrival for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.generated for r in self.requests)

    @property
    def throughput(self) -> float:
        """Output tokens per second over the run."""
        return self.output_tokens / self.duration if self.duration > 0 else math.inf

    @property
    def tpots(self) -> list[float]:
        return [t for r in self.requests if (t := r.tpot) is not None]

    @property
    def mean_tpot(self) -> float:
        tpots = self.tpots
        return sum(tpots) / len(tpots) if tpots else float("nan")

    def goodput(self, ttft: float | None = None, tpot: float | None = None) -> float:
        """Requests per second that met both bounds (None: no bound)."""
        good = sum(1 for r in self.requests if (ttft is None or r.ttft <= ttft)
                   and (tpot is None or r.tpot is None or r.tpot <= tpot))
        return good / self.duration if self.duration > 0 else math.inf

    def summary(self) -> dict:
        ttfts = [r.ttft for r in self.requests]
        tpots = self.tpots
        return {"layout": self.layout, "requests": len(self.requests), "output_tokens": self.output_tokens,
                "duration_s": self.duration, "throughput_tok_s": self.throughput,
                "ttft_mean_s": sum(ttfts) / len(ttfts), "ttft_p50_s": percentile(ttfts, 50),
                "ttft_p99_s": percentile(ttfts, 99), "tpot_mean_s": self.mean_tpot,
                "tpot_p50_s": percentile(tpots, 50), "tpot_p99_s": percentile(tpots, 99),
                "steps": self.num_steps, "preemptions": self.num_preemptions,
                "prefix_cache_hits": self.prefix_cache_hits, **self.extra}
