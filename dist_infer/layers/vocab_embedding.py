"""Vocabulary-parallel embedding and LM head.

The vocabulary ``V`` is padded to ``V_pad``, a multiple of the tensor-parallel size ``p``; rank ``r`` holds
rows [r*V_pad/p, (r+1)*V_pad/p) of the [V_pad, hidden] table (padding rows are zero).

* Embedding: a token outside this rank's range looks up a zero row (masked), so
  ``e(t) = sum_r e_r(t)`` after one all-reduce.
* LM head: ``logits_r = h W_r^T`` gives this rank's [*, V_pad/p] slice; an all-gather over the last dim
  and a trim to ``V`` give the full logits for sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_infer.distributed.parallel_state import get_tp_group
from dist_infer.layers.linear_method import UnquantizedLinearMethod
from dist_infer.layers.shard import TensorSource, check_dim, copy_into, narrow


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None):
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank_in_group, tp.world_size
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_padded = -(-num_embeddings // self.tp_size) * self.tp_size
        self.shard_size = self.num_embeddings_padded // self.tp_size
        self.vocab_start = self.tp_rank * self.shard_size
        self.vocab_end = min(self.vocab_start + self.shard_size, num_embeddings)
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(self.shard_size, embedding_dim, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: TensorSource, shard_id=None) -> None:
        """Rows [vocab_start, vocab_end) of the [V, hidden] table (or [V] bias); padding rows are zeroed."""
        check_dim(loaded, 0, self.num_embeddings)
        if param.dim() == 2:
            check_dim(loaded, 1, self.embedding_dim)
        rows = max(0, self.vocab_end - self.vocab_start)
        with torch.no_grad():
            param.data[rows:].zero_()
        copy_into(param.data[:rows], narrow(loaded, 0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_range, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight)
        out.masked_fill_(~in_range.unsqueeze(-1), 0)
        return get_tp_group().all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection hidden -> vocabulary, sharded like the embedding table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False, params_dtype=None):
        super().__init__(num_embeddings, embedding_dim, params_dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.shard_size, dtype=self.weight.dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.linear_method = UnquantizedLinearMethod()
        self.tied = False

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Shares the embedding table (tied word embeddings on a stage that holds both)."""
        self.weight = embedding.weight
        self.tied = True

    def process_weights_after_loading(self) -> None:
        # A tied table is still read by the embedding lookup, so its loaded copy stays.
        self.linear_method.process_weights_after_loading(self, weight_shared=self.tied)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, V] logits, gathered from every rank."""
        logits = self.linear_method.apply(self, hidden, self.bias)
        if self.tp_size > 1:
            logits = get_tp_group().all_gather(logits, dim=-1)
        return logits[..., : self.num_embeddings]
