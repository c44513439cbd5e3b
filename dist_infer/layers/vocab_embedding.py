"""Vocabulary-parallel embedding and LM head.

The vocabulary ``V`` is padded to ``V_pad``, a multiple of the tensor-parallel size ``p``; rank ``r`` holds
rows [r*V_pad/p, (r+1)*V_pad/p) of the [V_pad, hidden] table (padding rows are zero).

* Embedding: a token outside this rank's range looks up a zero row (masked), so
  ``e(t) = sum_r e_r(t)`` after one all-reduce.
* LM head: ``logits_r = h W_r^T`` gives this rank's [*, V_pad/p] slice; an all-gather over the last dim
  and a trim to ``V`` give the full logits for sampling.

With ``quantize=True`` both hold the table as int8 codes with one scale per vocabulary row (``quantize_int8``):
the embedding looks up codes and scales, the head multiplies through the quantized kernels
(``quantization/kernels.py``). A tied pair quantizes once and shares the codes, so the full-precision table is
released: for SmolLM2 that is 28 MB read per decoded token instead of 113 MB.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_infer.distributed.parallel_state import get_tp_group
from dist_infer.layers.linear_method import UnquantizedLinearMethod
from dist_infer.layers.quantization.kernels import QuantizedWeight, choose_kernels
from dist_infer.layers.quantization.math import quantize_int8
from dist_infer.layers.shard import TensorSource, check_dim, copy_into, narrow


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None,
                 quantize: bool = False):
        super().__init__()
        self.quantize = quantize
        self.table: QuantizedWeight | None = None  # int8 codes [V_pad/p, hidden] and row scales, once quantized
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

    def int8_table(self) -> QuantizedWeight:
        """The table quantized (once); the full-precision copy is released."""
        if self.table is None:
            q, scale = quantize_int8(self.weight.data)
            self.table = QuantizedWeight("int8", q, scale, None, 0, keep=[q, scale])
            self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)
        return self.table

    def process_weights_after_loading(self) -> None:
        if self.quantize:
            self.int8_table()

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            return F.embedding(ids, self.weight)
        codes = F.embedding(ids, self.table.keep[0]).to(self.weight.dtype)
        return codes * F.embedding(ids, self.table.keep[1][:, None]).to(self.weight.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._lookup(input_ids)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_range, input_ids - self.vocab_start, 0)
        out = self._lookup(local_ids)
        out.masked_fill_(~in_range.unsqueeze(-1), 0)
        return get_tp_group().all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection hidden -> vocabulary, sharded like the embedding table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False, params_dtype=None,
                 quantize: bool = False):
        super().__init__(num_embeddings, embedding_dim, params_dtype, quantize)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.shard_size, dtype=self.weight.dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.linear_method = UnquantizedLinearMethod()
        self.tied: VocabParallelEmbedding | None = None
        self.quantized: QuantizedWeight | None = None  # the head's matmul over the int8 table

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Shares the embedding table (tied word embeddings on a stage that holds both)."""
        if embedding.quantize != self.quantize:
            raise ValueError("a tied embedding and LM head must both be quantized or both not")
        self.weight = embedding.weight
        self.tied = embedding

    def process_weights_after_loading(self) -> None:
        if self.quantize:
            # A tied pair shares one int8 table, whichever of the two gets here first.
            table = (self.tied or self).int8_table()
            self.quantized = QuantizedWeight("int8", table.keep[0], table.keep[1], None, 0)
            choose_kernels(self.quantized, self.weight.dtype, table.keep[0].device)
            return
        # A tied table is still read by the embedding lookup, so its loaded copy stays.
        self.linear_method.process_weights_after_loading(self, weight_shared=self.tied is not None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, V] logits, gathered from every rank."""
        if self.quantized is not None:
            logits = self.quantized.matmul(hidden)
            if self.bias is not None:
                logits = logits + self.bias
        else:
            logits = self.linear_method.apply(self, hidden, self.bias)
        if self.tp_size > 1:
            logits = get_tp_group().all_gather(logits, dim=-1)
        return logits[..., : self.num_embeddings]
