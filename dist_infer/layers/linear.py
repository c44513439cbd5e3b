"""Tensor-parallel linear layers (Megatron style).

Notation: ``y = x W^T + b`` with ``W`` of shape [out, in]; ``p`` = tensor-parallel size, ``r`` = this rank.

* Column parallel: ``W = [W_0; W_1; ...; W_{p-1}]`` split along ``out``. Rank ``r`` holds ``W_r`` of shape
  [out/p, in] and computes ``y_r = x W_r^T + b_r`` -- its own slice of the output features, no communication.
* Row parallel: ``W = [W_0, W_1, ..., W_{p-1}]`` split along ``in``. Rank ``r`` holds ``W_r`` of shape
  [out, in/p], receives ``x_r`` (the slice a column-parallel layer produced) and computes
  ``y = sum_r x_r W_r^T + b`` with one all-reduce; the bias is added once, after the sum.

A column-parallel layer followed by a row-parallel one (QKV -> attention -> O, gate/up -> SiLU -> down) needs
exactly one all-reduce per pair. At ``p = 1`` every layer here is a plain ``nn.Linear``.

Each parameter carries ``weight_loader(param, loaded, shard_id=None)``: ``loaded`` is the full checkpoint
tensor (or a lazy safetensors slice) and the loader narrows it to this rank's part before reading. A fused
projection takes either one checkpoint tensor per part (``shard_id`` names the part) or, with
``shard_id=None``, a checkpoint that already stores the parts fused (Phi-3's ``qkv_proj`` [q; k; v] and
``gate_up_proj`` [gate; up]): each part's rows for this rank are then read from their own offset in it.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_infer.distributed.parallel_state import get_tp_group
from dist_infer.layers.linear_method import UnquantizedLinearMethod
from dist_infer.layers.quantization.config import QuantConfig
from dist_infer.layers.quantization.linear_method import QuantizedLinearMethod
from dist_infer.layers.shard import TensorSource, check_dim, copy_into, default_weight_loader, narrow, source_shape


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by tensor_parallel_size={denominator}")
    return numerator // denominator


class LinearBase(nn.Module):
    """Holds a [out_local, in_local] weight (or its quantized form) and optional [out_local] bias, created empty
    (the loader fills them). ``quant_config`` selects weight-only quantization."""

    splits_input = False  # row-parallel layers split their input features across ranks

    def __init__(self, in_local: int, out_local: int, bias: bool, params_dtype: torch.dtype | None,
                 quant_config: QuantConfig | None = None):
        super().__init__()
        dtype = params_dtype or torch.get_default_dtype()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank_in_group, tp.world_size
        if quant_config is None:
            self.linear_method = UnquantizedLinearMethod()
            self.weight = nn.Parameter(torch.empty(out_local, in_local, dtype=dtype), requires_grad=False)
            self.weight.weight_loader = self.weight_loader
        else:
            self.linear_method = QuantizedLinearMethod(quant_config)
            self.linear_method.create_weights(self, out_local, in_local, dtype, self.splits_input and self.tp_size > 1)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_local, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: TensorSource, shard_id=None) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self) -> None:
        self.linear_method.process_weights_after_loading(self)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x W^T + bias`` with this rank's weight."""
        return self.linear_method.apply(self, x, bias)


class ColumnParallelLinear(LinearBase):
    """``y_r = x W_r^T + b_r`` with ``W_r`` = rows [r*out/p, (r+1)*out/p) of ``W``.

    Input [..., in] (replicated), output [..., out/p] (this rank's features), or [..., out] with
    ``gather_output=True`` (all-gather over the last dim).
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False, gather_output: bool = False,
                 params_dtype=None, output_sizes: list[int] | None = None, quant_config=None):
        tp_size = get_tp_group().world_size
        self.output_sizes = list(output_sizes or [output_size])
        self.local_sizes = [_divide(s, tp_size, "output size") for s in self.output_sizes]
        super().__init__(input_size, sum(self.local_sizes), bias, params_dtype, quant_config)
        self.input_size, self.output_size = input_size, output_size
        self.gather_output = gather_output

    def weight_loader(self, param, loaded, shard_id=None):
        if shard_id is not None:
            check_dim(loaded, 0, self.output_sizes[shard_id])
            self._load_shard(param, loaded, shard_id, 0)
            return
        # The whole (possibly fused) tensor: every part from its own rows.
        check_dim(loaded, 0, sum(self.output_sizes))
        for index in range(len(self.output_sizes)):
            self._load_shard(param, loaded, index, sum(self.output_sizes[:index]))

    def _load_shard(self, param, loaded, index: int, base: int) -> None:
        """This rank's rows of part ``index``, which starts at row ``base`` of ``loaded``."""
        offset = sum(self.local_sizes[:index])
        size = self.local_sizes[index]
        if param.dim() == 2:
            check_dim(loaded, 1, param.shape[1])
        copy_into(param.data.narrow(0, offset, size), narrow(loaded, 0, base + self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, self.bias)
        if self.gather_output:
            y = get_tp_group().all_gather(y, dim=-1)
        return y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul.

    ``W = [A; B]`` (e.g. gate and up). Rank ``r`` holds ``[A_r; B_r]``, so its output is
    ``[x A_r^T, x B_r^T]`` -- each half sliced consistently for the elementwise op that follows.
    ``shard_id`` is the index of the checkpoint tensor in ``output_sizes``, or None for a checkpoint tensor
    holding all of them fused in order.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, params_dtype=None,
                 quant_config=None):
        super().__init__(input_size, sum(output_sizes), bias=bias, params_dtype=params_dtype, output_sizes=output_sizes,
                         quant_config=quant_config)


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections fused, sharded by attention head.

    Rank ``r`` holds ``num_heads/p`` query heads. Key/value heads are split the same way when
    ``p <= num_kv_heads``; when ``p > num_kv_heads`` each KV head is replicated on ``p/num_kv_heads`` ranks
    (rank ``r`` holds KV head ``r // (p/num_kv_heads)``), so every rank keeps the query heads that share it.
    Output per token: [q (num_heads_local*head_dim), k (num_kv_local*head_dim), v (num_kv_local*head_dim)].
    """

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False, params_dtype=None, quant_config=None):
        tp_size = get_tp_group().world_size
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = _divide(total_num_heads, tp_size, "num_attention_heads")
        if tp_size >= total_num_kv_heads:
            if tp_size % total_num_kv_heads:
                raise ValueError(
                    f"tensor_parallel_size={tp_size} is not a multiple of num_key_value_heads={total_num_kv_heads}"
                )
            self.num_kv_heads, self.kv_replicas = 1, tp_size // total_num_kv_heads
        else:
            self.num_kv_heads, self.kv_replicas = _divide(total_num_kv_heads, tp_size, "num_key_value_heads"), 1
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.q_size, self.kv_size = q, kv
        LinearBase.__init__(self, hidden_size, q + 2 * kv, bias, params_dtype, quant_config)
        self.input_size = hidden_size
        self.gather_output = False

    def weight_loader(self, param, loaded, shard_id=None):
        """``shard_id`` 'q', 'k' or 'v' for one checkpoint tensor; None for the fused [q; k; v] tensor."""
        q_total, kv_total = self.total_num_heads * self.head_dim, self.total_num_kv_heads * self.head_dim
        bases = {"q": 0, "k": q_total, "v": q_total + kv_total}
        if shard_id is None:
            check_dim(loaded, 0, q_total + 2 * kv_total)
            for part, base in bases.items():
                self._load_part(param, loaded, part, base)
            return
        if shard_id not in bases:
            raise ValueError(f"QKV shard_id must be 'q', 'k', 'v' or None (fused), got {shard_id!r}")
        check_dim(loaded, 0, q_total if shard_id == "q" else kv_total)
        self._load_part(param, loaded, shard_id, 0)

    def _load_part(self, param, loaded, part: str, base: int) -> None:
        """This rank's rows of ``part``, which starts at row ``base`` of ``loaded``."""
        if part == "q":
            offset, size, start = 0, self.q_size, self.tp_rank * self.q_size
        else:
            offset = self.q_size if part == "k" else self.q_size + self.kv_size
            size, start = self.kv_size, (self.tp_rank // self.kv_replicas) * self.kv_size
        if param.dim() == 2:
            check_dim(loaded, 1, param.shape[1])
        copy_into(param.data.narrow(0, offset, size), narrow(loaded, 0, base + start, size))


class RowParallelLinear(LinearBase):
    """``y = sum_r x_r W_r^T + b`` with ``W_r`` = columns [r*in/p, (r+1)*in/p) of ``W``.

    Input [..., in/p] (this rank's slice), output [..., out] (summed over ranks by one all-reduce when
    ``reduce_results``; the bias is added after the reduction so it counts once).
    """

    splits_input = True

    def __init__(self, input_size: int, output_size: int, bias: bool = False, reduce_results: bool = True,
                 params_dtype=None, quant_config=None):
        tp_size = get_tp_group().world_size
        self.input_size_local = _divide(input_size, tp_size, "input size")
        super().__init__(self.input_size_local, output_size, bias, params_dtype, quant_config)
        self.input_size, self.output_size = input_size, output_size
        self.reduce_results = reduce_results

    def weight_loader(self, param, loaded, shard_id=None):
        """Columns [r*c/p, (r+1)*c/p) of a 2-D tensor with c columns: the weight's input features, or an int4
        scale's groups of them; 1-D tensors (the bias, int8 scales) are whole on every rank."""
        check_dim(loaded, 0, self.output_size)
        if param.dim() == 1:
            copy_into(param.data, narrow(loaded, 0, 0, self.output_size))
            return
        columns = source_shape(loaded)[1]
        size = _divide(columns, self.tp_size, "input columns of a row-parallel tensor")
        copy_into(param.data, narrow(loaded, 1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.matmul(x, self.bias)
        return self.reduce(self.matmul(x, None))

    def reduce(self, y: torch.Tensor) -> torch.Tensor:
        """This rank's partial product -> the layer's output: summed over the ranks, then the bias added."""
        if self.reduce_results:
            y = get_tp_group().all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y


class ReplicatedLinear(LinearBase):
    """``y = x W^T + b`` with the whole ``W`` on every rank: small projections every rank needs in full, such as
    a mixture-of-experts router. Never quantized."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, params_dtype=None):
        super().__init__(input_size, output_size, bias, params_dtype)
        self.input_size, self.output_size = input_size, output_size

    def weight_loader(self, param, loaded, shard_id=None):
        default_weight_loader(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)
