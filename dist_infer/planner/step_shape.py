"""What one engine step computes, as the cost model sees it, and the layout it runs on.

A step is a list of (query tokens, context tokens) per request: ``q`` new tokens attend to the ``c`` tokens the
KV cache held before the step plus themselves (a decode is ``(1, c)``, a first prompt chunk ``(n, 0)``, a later
chunk or a prefix hit ``(n, c)``), and the rows whose sequence reached its end are sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_infer.engine.messages import SchedulerOutput


@dataclass(frozen=True)
class StepShape:
    queries: tuple[tuple[int, int], ...]  # (query_len, context_len) per scheduled request
    num_sampled: int

    @property
    def num_tokens(self) -> int:
        return sum(q for q, _ in self.queries)

    @property
    def num_seqs(self) -> int:
        return len(self.queries)

    @property
    def decode_context(self) -> int:
        """Σ c over decodes: keys each decode reads."""
        return sum(c + 1 for q, c in self.queries if q == 1)

    @property
    def num_decodes(self) -> int:
        return sum(1 for q, _ in self.queries if q == 1)

    @property
    def prefill_pairs(self) -> int:
        """Σ over prompt chunks of query-key pairs a causal chunk computes: q (c + (q + 1) / 2)."""
        return sum(q * c + q * (q + 1) // 2 for q, c in self.queries if q > 1)

    @property
    def prefill_keys(self) -> int:
        """Σ over prompt chunks with earlier context of the keys gathered from the cache (c + q)."""
        return sum(c + q for q, c in self.queries if q > 1 and c > 0)

    @property
    def num_prefills(self) -> int:
        return sum(1 for q, _ in self.queries if q > 1)


def attention_features(queries) -> dict[str, float]:
    """The terms the attention cost is fitted over (``profiler``): per kind of call (decodes, prompt chunks) the
    call itself, its requests, and the keys read or query-key pairs computed."""
    decodes = [c for q, c in queries if q == 1]
    chunks = [(q, c) for q, c in queries if q > 1]
    return {"decode_call": float(bool(decodes)), "decodes": len(decodes), "decode_keys": sum(c + 1 for c in decodes),
            "prefill_call": float(bool(chunks)), "prefills": len(chunks),
            "prefill_pairs": sum(q * c + q * (q + 1) / 2 for q, c in chunks),
            "prefill_keys": sum(c + q for q, c in chunks if c)}


def step_shape(scheduled: SchedulerOutput, num_tokens: dict[str, int]) -> StepShape:
    """The shape of ``scheduled``; ``num_tokens``: every scheduled request's known tokens (a row is sampled when
    its chunk reaches the last of them)."""
    context = {r.req_id: r.num_computed_tokens for r in scheduled.new_requests}
    context.update((r.req_id, r.num_computed_tokens) for r in scheduled.cached_requests)
    queries, sampled = [], 0
    for req_id, n in scheduled.num_scheduled_tokens.items():
        c = context[req_id]
        queries.append((n, c))
        sampled += c + n >= num_tokens[req_id]
    return StepShape(tuple(queries), sampled)


@dataclass(frozen=True)
class Layout:
    """tp x pp x dp workers; ``layers``: each pipeline stage's layer count."""

    tp: int
    pp: int
    dp: int
    layers: tuple[int, ...]

    @classmethod
    def even(cls, tp: int, pp: int, dp: int, num_layers: int) -> Layout:
        """Stages as the engine splits them by default: as even as possible, earlier stages taking the remainder."""
        return cls(tp, pp, dp, tuple(num_layers // pp + (1 if s < num_layers % pp else 0) for s in range(pp)))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        return f"tp{self.tp} pp{self.pp} dp{self.dp}"
