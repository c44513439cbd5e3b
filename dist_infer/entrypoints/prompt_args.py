"""Arguments given once for all prompts of a batch or once per prompt (``LLM`` and the named Ray service)."""

from __future__ import annotations

from dist_infer.sampling_params import SamplingParams


def per_prompt(value, n: int, name: str) -> list:
    """One value per prompt: None gives default SamplingParams, a single value repeats, a list must match."""
    if value is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n
