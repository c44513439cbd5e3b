"""Mixture-of-experts feed-forward: top-k routing, experts computed grouped by expert.

For token rows ``x`` [T, H] and router logits ``l = x G^T`` [T, E] (a replicated gate):

    p = softmax(l) (fp32),   (w, e) = top-k(p) [T, k],   w <- w / sum_j w_j  when renormalizing,
    y_t = sum_j w_tj * W_down[e_tj] (silu(W_gate[e_tj] x_t) * W_up[e_tj] x_t).

The T*k (token, expert) pairs are sorted by expert, each expert runs one matmul over its rows, and the
weighted rows are added back into their tokens with one ``index_add`` -- no loop over tokens.

Weights are stacked: ``gate_up_proj`` [E_local, 2*I_local, H] (gate rows, then up rows) and ``down_proj``
[E_local, H, I_local]. Two placements:

* tensor-sliced (default): every rank holds all E experts, each sliced over the tp group like a dense MLP:
  gate/up rows [r*I/p, (r+1)*I/p) (column parallel), down columns the same (row parallel). A rank's ``y`` is a
  partial sum over intermediate features that one tp all-reduce completes.
* expert parallel (``enable_expert_parallel``): ep rank ``q`` (see ``parallel_state``'s ``ep`` group) holds
  whole experts [q*E/ep, (q+1)*E/ep); pairs routed elsewhere contribute nothing on it. The ranks of a tp group
  see the same tokens, so each computes its experts for all of them and a tp all-reduce sums over experts.
  When data-parallel ranks share the ep group (one torch world), their tokens differ: each rank all-gathers
  its dp group's tokens and routing (row counts first, every rank padded to the largest), computes its
  experts over all of them, the tp all-reduce sums within a replica and a dp reduce-scatter sums across
  replicas and hands each dp rank its own rows. A rank with no tokens joins with 0 rows.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from dist_infer.distributed.parallel_state import ParallelGroup, get_dp_group, get_ep_group, get_tp_group
from dist_infer.layers.activation import SiluAndMul
from dist_infer.layers.shard import TensorSource, check_dim, copy_into, narrow

_EXPERT_PARALLEL = [False]


@contextmanager
def expert_parallel(enabled: bool):
    """FusedMoE layers built inside take ``enable_expert_parallel`` from here, so model code need not pass it."""
    previous, _EXPERT_PARALLEL[0] = _EXPERT_PARALLEL[0], bool(enabled)
    try:
        yield
    finally:
        _EXPERT_PARALLEL[0] = previous


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def experts_per_rank(num_experts: int, ep_size: int) -> int:
    """``num_experts / ep_size``; a ValueError naming the sizes that split the experts evenly otherwise."""
    if num_experts % ep_size:
        raise ValueError(
            f"num_experts={num_experts} cannot be split evenly over {ep_size} expert-parallel ranks; valid "
            f"expert-parallel sizes: {', '.join(map(str, divisors(num_experts)))}")
    return num_experts // ep_size


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] logits -> (weights [T, k] fp32, expert ids [T, k] int64), the highest-probability first."""
    weights, ids = torch.topk(torch.softmax(router_logits.float(), dim=-1), top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, first_expert: int) -> torch.Tensor:
    """``y_t = sum_j w_tj * expert_{e_tj}(x_t)`` over the pairs whose expert is one of the ``E_local`` held here
    (ids [first_expert, first_expert + E_local)); x [T, H], weights/ids [T, k] -> [T, H]."""
    out = torch.zeros_like(x)
    top_k, num_local = ids.shape[1], gate_up.shape[0]
    local = ids.reshape(-1) - first_expert
    pairs = ((local >= 0) & (local < num_local)).nonzero().squeeze(1)
    if not pairs.numel():
        return out
    experts, order = local[pairs].sort(stable=True)
    pairs = pairs[order]
    tokens = pairs // top_k
    rows = x[tokens]
    act = SiluAndMul()
    start = 0
    for e, count in enumerate(torch.bincount(experts, minlength=num_local).tolist()):
        if count:
            block = rows[start:start + count]
            rows[start:start + count] = act(block @ gate_up[e].t()) @ down[e].t()
            start += count
    out.index_add_(0, tokens, (rows * weights.reshape(-1)[pairs].unsqueeze(1)).to(x.dtype))
    return out


class FusedMoE(nn.Module):
    """The experts of one layer: ``forward(x [T, H], router_logits [T, E]) -> [T, H]``, summed over all ranks."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
                 params_dtype: torch.dtype | None = None, enable_expert_parallel: bool | None = None):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.expert_parallel = _EXPERT_PARALLEL[0] if enable_expert_parallel is None else bool(enable_expert_parallel)
        tp = get_tp_group()
        if self.expert_parallel:
            ep = get_ep_group()
            self.num_local = experts_per_rank(num_experts, ep.world_size)
            self.first_expert = ep.rank_in_group * self.num_local
            self.intermediate_local, self.slice_rank = intermediate_size, 0
        else:
            if intermediate_size % tp.world_size:
                valid = ", ".join(str(t) for t in divisors(intermediate_size))
                raise ValueError(
                    f"expert intermediate size {intermediate_size} is not divisible by tensor_parallel_size="
                    f"{tp.world_size} (experts are sliced over the tensor-parallel ranks); valid sizes: {valid}; "
                    f"or enable_expert_parallel to keep each expert whole")
            self.num_local, self.first_expert = num_experts, 0
            self.intermediate_local, self.slice_rank = intermediate_size // tp.world_size, tp.rank_in_group
        dtype = params_dtype or torch.get_default_dtype()
        n, i_local = self.num_local, self.intermediate_local
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * i_local, hidden_size, dtype=dtype), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(n, hidden_size, i_local, dtype=dtype), requires_grad=False)
        self.gate_up_proj.weight_loader = self.down_proj.weight_loader = self.weight_loader

    @property
    def expert_ids(self) -> list[int]:
        """The experts this rank holds (whole or sliced)."""
        return list(range(self.first_expert, self.first_expert + self.num_local))

    def weight_loader(self, param: nn.Parameter, loaded: TensorSource, shard_id) -> None:
        """``shard_id = (expert, "gate" | "up" | "down")``: one expert's [I, H] gate/up or [H, I] down tensor.
        Reads this rank's slice of it (tensor-sliced), all of it (expert parallel, an expert held here), or
        nothing (another rank's expert)."""
        expert, which = shard_id
        local = expert - self.first_expert
        if not 0 <= local < self.num_local:
            return
        size, start = self.intermediate_local, self.slice_rank * self.intermediate_local
        if which == "down":
            check_dim(loaded, 0, self.hidden_size)
            check_dim(loaded, 1, self.intermediate_size)
            copy_into(param.data[local], narrow(loaded, 1, start, size))
        elif which in ("gate", "up"):
            check_dim(loaded, 0, self.intermediate_size)
            check_dim(loaded, 1, self.hidden_size)
            copy_into(param.data[local].narrow(0, 0 if which == "gate" else size, size), narrow(loaded, 0, start, size))
        else:
            raise ValueError(f"expert shard must be 'gate', 'up' or 'down', got {which!r}")

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        dp = get_dp_group()
        if self.expert_parallel and dp.world_size > 1:
            return self._across_replicas(x, weights, ids, dp)
        y = grouped_experts(x, weights, ids, self.gate_up_proj, self.down_proj, self.first_expert)
        return get_tp_group().all_reduce(y)

    def _across_replicas(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                         dp: ParallelGroup) -> torch.Tensor:
        """Expert parallel over replicas with different tokens: gather, compute, sum, scatter back."""
        rows = x.shape[0]
        pad = int(dp.all_gather(torch.tensor([rows], device=x.device), dim=0).max())
        if pad == 0:  # every rank agrees, as every rank saw the same counts
            return torch.zeros_like(x)
        padded_x = torch.zeros(pad, x.shape[1], dtype=x.dtype, device=x.device)
        padded_x[:rows] = x
        # Weights and ids travel together in fp32 (ids are exact there); padding rows route to expert -1,
        # which no rank holds.
        routing = torch.full((pad, 2 * self.top_k), -1.0, device=x.device)
        routing[:rows] = torch.cat([weights, ids.float()], dim=1)
        all_x, all_routing = dp.all_gather(padded_x, dim=0), dp.all_gather(routing, dim=0)
        y = grouped_experts(all_x, all_routing[:, :self.top_k], all_routing[:, self.top_k:].long(), self.gate_up_proj,
                            self.down_proj, self.first_expert)
        y = get_tp_group().all_reduce(y)
        return dp.reduce_scatter(y)[:rows]
