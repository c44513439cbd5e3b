"""Distillation losses over the teacher's top-k.

The teacher sends only its k most likely tokens per position, so both distributions are compared on the k + 1
outcomes "token i of the top k" and "any other token" (the tail): ``p_i`` from the teacher's logprobs,
``p_tail = 1 - sum_i p_i``; ``q_i = softmax(z)_i`` from the student's full logits ``z``, ``q_tail = 1 - sum_i q_i``.
Both are proper distributions over the k + 1 outcomes, so

    forward KL(p || q) = sum_i p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)   (mass-covering)
    reverse KL(q || p) = sum_i q_i (log q_i - log p_i) + q_tail (log q_tail - log p_tail)   (mode-seeking)
    mixed              = a * forward + (1 - a) * reverse

are >= 0 and 0 exactly when the student matches the teacher on every top-k token. Optional cross-entropy on the
text adds ``ce_weight * -log q(x_{t+1})``. All terms are means over positions, computed in fp32.
"""

from __future__ import annotations

import torch

_TINY = 1e-12  # keeps log() of an exactly-zero tail finite; any such term has zero weight anyway


def _with_tail(logprobs: torch.Tensor) -> torch.Tensor:
    """``[..., k]`` logprobs -> ``[..., k + 1]`` with ``log(1 - sum exp)`` appended (clamped into (0, 1])."""
    tail = torch.log1p(-logprobs.exp().sum(-1).clamp(max=1.0 - 1e-7)).clamp_min(torch.log(torch.tensor(_TINY)))
    return torch.cat([logprobs, tail.unsqueeze(-1)], dim=-1)


def topk_kl(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
            kind: str = "forward_kl", mix: float = 0.5) -> torch.Tensor:
    """Per-position KL ``[...]`` between teacher and student on the top-k-plus-tail outcomes.

    ``student_logits [..., V]``, ``top_ids [..., k]`` (int), ``top_logprobs [..., k]`` (the teacher's).
    """
    log_q = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, top_ids.long())
    log_q, log_p = _with_tail(log_q), _with_tail(top_logprobs.float())
    forward = (log_p.exp() * (log_p - log_q)).sum(-1)
    if kind == "forward_kl":
        return forward
    reverse = (log_q.exp() * (log_q - log_p)).sum(-1)
    if kind == "reverse_kl":
        return reverse
    if kind == "mixed":
        return mix * forward + (1.0 - mix) * reverse
    raise ValueError(f"unknown distillation loss {kind!r}")


def distill_loss(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
                 labels: torch.Tensor, kind: str = "forward_kl", mix: float = 0.5,
                 ce_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean loss over positions and its parts. ``student_logits [B, T - 1, V]`` (the positions that have a next
    token), ``labels [B, T - 1]`` (that next token)."""
    kl = topk_kl(student_logits, top_ids, top_logprobs, kind, mix).mean()
    parts = {"kl": kl.detach()}
    loss = kl
    if ce_weight:
        ce = torch.nn.functional.cross_entropy(student_logits.flatten(0, -2).float(), labels.flatten())
        parts["ce"] = ce.detach()
        loss = loss + ce_weight * ce
    return loss, parts
