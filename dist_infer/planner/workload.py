"""Workloads the simulator and the validation runs share: who arrives when, with how many prompt and output tokens.

Three kinds, each a list of ``WorkItem`` sorted by arrival:

* ``fixed_batch(n, prompt_len, output_len)``: ``n`` requests, all there at time 0 (an offline batch);
* ``poisson(rate, n, prompt_len, output_len, seed)``: ``n`` requests whose gaps are exponential with mean
  ``1 / rate`` seconds (a Poisson process of ``rate`` requests per second);
* ``load_trace(path)``: a JSONL or CSV file with one request per line: ``arrival_s``, ``prompt_len``,
  ``output_len`` and optionally ``prefix_len`` and ``prefix_group`` (requests of one group share their first
  ``prefix_len`` prompt tokens, as chat turns sharing a system prompt do).

Lengths may be an int or a ``(low, high)`` range drawn uniformly. Token ids are drawn from a seeded generator
(shared prefixes equal within their group), so that prefix caching sees exactly what a real run with the same
ids would see; output lengths are enforced with ``ignore_eos``, as benchmarks do.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass

Length = int | tuple[int, int]


@dataclass(frozen=True)
class WorkItem:
    arrival_s: float
    prompt_token_ids: tuple[int, ...]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class Workload:
    """A named list of requests (sorted by arrival)."""

    name: str
    items: tuple[WorkItem, ...]

    def __post_init__(self) -> None:
        if not self.items:
            raise ValueError(f"workload {self.name!r} has no requests")
        if any(b.arrival_s < a.arrival_s for a, b in zip(self.items, self.items[1:])):
            raise ValueError(f"workload {self.name!r}: requests must be sorted by arrival_s")

    @property
    def max_total_len(self) -> int:
        return max(item.prompt_len + item.output_len for item in self.items)

    def describe(self) -> str:
        prompts = [i.prompt_len for i in self.items]
        outputs = [i.output_len for i in self.items]
        return (f"{self.name}: {len(self.items)} requests, prompt {min(prompts)}-{max(prompts)} tokens, "
                f"output {min(outputs)}-{max(outputs)} tokens")


def _draw(rng: random.Random, length: Length, what: str) -> int:
    if isinstance(length, int) and not isinstance(length, bool):
        low = high = length
    elif isinstance(length, (tuple, list)) and len(length) == 2 and all(isinstance(v, int) for v in length):
        low, high = length
    else:
        raise ValueError(f"{what} must be an int or a (low, high) pair of ints, got {length!r}")
    if not 1 <= low <= high:
        raise ValueError(f"{what} must be >= 1 (and low <= high), got {length!r}")
    return rng.randint(low, high)


def _token_ids(rng: random.Random, n: int, vocab_size: int) -> tuple[int, ...]:
    # Ids from 1: some tokenizers give 0 a special role, and the ids never need to decode to text.
    return tuple(rng.randrange(1, vocab_size) for _ in range(n))


def fixed_batch(n: int, prompt_len: Length, output_len: Length, vocab_size: int = 32000, seed: int = 0) -> Workload:
    """``n`` requests, every one arriving at time 0."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"a fixed batch needs n >= 1 requests, got {n!r}")
    rng = random.Random(seed)
    items = tuple(WorkItem(0.0, _token_ids(rng, _draw(rng, prompt_len, "prompt_len"), vocab_size),
                           _draw(rng, output_len, "output_len")) for _ in range(n))
    return Workload(f"fixed batch of {n}", items)


def poisson(rate: float, n: int, prompt_len: Length, output_len: Length, vocab_size: int = 32000,
            seed: int = 0) -> Workload:
    """``n`` requests arriving as a Poisson process of ``rate`` requests per second (first at 0)."""
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not rate > 0:
        raise ValueError(f"the Poisson rate must be a positive number of requests per second, got {rate!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"a Poisson workload needs n >= 1 requests, got {n!r}")
    rng = random.Random(seed)
    items, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        items.append(WorkItem(t, _token_ids(rng, _draw(rng, prompt_len, "prompt_len"), vocab_size),
                              _draw(rng, output_len, "output_len")))
    return Workload(f"Poisson {rate:g} req/s x {n}", tuple(items))


_TRACE_FIELDS = ("arrival_s", "prompt_len", "output_len", "prefix_len", "prefix_group")


def load_trace(path: str, vocab_size: int = 32000, seed: int = 0) -> Workload:
    """A trace file (JSONL, or CSV with a header): one request per line, see the module docstring."""
    rows = _read_rows(path)
    rng = random.Random(seed)
    prefixes: dict[str, tuple[int, ...]] = {}
    items = []
    for where, row in rows:
        unknown = sorted(set(row) - set(_TRACE_FIELDS))
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]!r} (expected {', '.join(_TRACE_FIELDS)})")
        try:
            arrival = float(row["arrival_s"])
            prompt_len, output_len = int(row["prompt_len"]), int(row["output_len"])
            prefix_len = int(row.get("prefix_len") or 0)
        except KeyError as e:
            raise ValueError(f"{where}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError):
            raise ValueError(f"{where}: arrival_s, prompt_len, output_len and prefix_len must be numbers") from None
        if arrival < 0 or prompt_len < 1 or output_len < 1 or not 0 <= prefix_len <= prompt_len:
            raise ValueError(f"{where}: need arrival_s >= 0, prompt_len >= 1, output_len >= 1 and "
                             f"0 <= prefix_len <= prompt_len")
        group = str(row.get("prefix_group", ""))
        shared = ()
        if prefix_len:
            shared = prefixes.setdefault(group, _token_ids(rng, prefix_len, vocab_size))
            if len(shared) < prefix_len:
                raise ValueError(f"{where}: prefix_group {group!r} was first given a prefix of {len(shared)} tokens")
            shared = shared[:prefix_len]
        items.append(WorkItem(arrival, shared + _token_ids(rng, prompt_len - prefix_len, vocab_size), output_len))
    items.sort(key=lambda item: item.arrival_s)
    return Workload(f"trace {path}", tuple(items))


def _read_rows(path: str) -> list[tuple[str, dict]]:
    try:
        with open(path, newline="") as f:
            if path.endswith(".csv"):
                return [(f"{path}:{n}", row) for n, row in enumerate(csv.DictReader(f), start=2)]
            rows = []
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n}: each line must be a JSON object")
                rows.append((f"{path}:{n}", row))
            return rows
    except OSError as e:
        raise ValueError(f"cannot read trace {path}: {e.strerror}") from None


def parse_workload(spec: str, vocab_size: int = 32000, seed: int = 0) -> Workload:
    """A workload from its command-line form:

    * ``batch:N:PROMPT:OUTPUT`` -- a fixed batch (lengths ``128`` or ``64-256``);
    * ``poisson:RATE:N:PROMPT:OUTPUT`` -- Poisson arrivals at RATE requests per second;
    * ``trace:PATH`` -- a trace file.
    """
    kind, _, rest = spec.partition(":")
    parts = rest.split(":")
    try:
        if kind == "batch" and len(parts) == 3:
            return fixed_batch(int(parts[0]), _length(parts[1]), _length(parts[2]), vocab_size, seed)
        if kind == "poisson" and len(parts) == 4:
            return poisson(float(parts[0]), int(parts[1]), _length(parts[2]), _length(parts[3]), vocab_size, seed)
    except ValueError as e:
        raise ValueError(f"workload {spec!r}: {e}") from None
    if kind == "trace" and rest:
        return load_trace(rest, vocab_size, seed)
    raise ValueError(f"workload {spec!r} is not batch:N:PROMPT:OUTPUT, poisson:RATE:N:PROMPT:OUTPUT or trace:PATH")


def _length(text: str) -> Length:
    low, sep, high = text.partition("-")
    return (int(low), int(high)) if sep else int(low)
