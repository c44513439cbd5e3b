"""How a quantized linear layer holds and applies its weight.

From a full-precision checkpoint, the layer loads its weight as usual (its tensor-parallel shard) and
quantizes that shard after loading, so tensor parallelism and quantization compose. A row-parallel shard holds
part of each output row: for int8 the ranks agree on the row's maximum (one all-reduce) so that the per-row
scale is the same as at tp=1; int4 groups lie inside a shard and need nothing. From a checkpoint that
``dist-infer quantize`` wrote, it loads q, scale (and zero) directly, through the same sharding loaders:
column-parallel layers slice them by output rows, row-parallel layers by input columns (for int4 the group
columns split with them, which is why each rank's input slice must hold whole groups).
"""

from __future__ import annotations

import torch
from torch import nn

from dist_infer.distributed.parallel_state import get_tp_group
from dist_infer.layers.quantization.config import QuantConfig
from dist_infer.layers.quantization.kernels import QuantizedWeight, choose_kernels
from dist_infer.layers.quantization.math import num_groups, quantize_int4, quantize_int8


class QuantizedLinearMethod:
    def __init__(self, config: QuantConfig):
        self.config = config

    def create_weights(self, layer: nn.Module, out_local: int, in_local: int, dtype: torch.dtype,
                       splits_input: bool) -> None:
        cfg = self.config
        if cfg.method == "int4" and splits_input and in_local % cfg.group_size:
            raise ValueError(
                f"int4 groups of {cfg.group_size} input features do not fit the {in_local} input features each "
                f"tensor-parallel rank of a row-parallel layer holds; choose a group size that divides {in_local}"
            )
        layer.params_dtype = dtype
        if not cfg.prequantized:
            _param(layer, "weight", torch.empty(out_local, in_local, dtype=dtype))
            return
        if cfg.method == "int8":
            _param(layer, "weight_q", torch.empty(out_local, in_local, dtype=torch.int8))
            _param(layer, "weight_scale", torch.empty(out_local, dtype=torch.float32))
        else:
            groups = num_groups(in_local, cfg.group_size)
            _param(layer, "weight_q", torch.empty(out_local, in_local, dtype=torch.uint8))
            _param(layer, "weight_scale", torch.empty(out_local, groups, dtype=torch.float32))
            _param(layer, "weight_zero", torch.empty(out_local, groups, dtype=torch.float32))

    def process_weights_after_loading(self, layer: nn.Module, weight_shared: bool = False) -> None:
        cfg = self.config
        if cfg.prequantized:
            q, scale = layer.weight_q.data, layer.weight_scale.data
            zero = layer.weight_zero.data if cfg.method == "int4" else None
        elif cfg.method == "int8":
            absmax = None
            if getattr(layer, "splits_input", False) and layer.tp_size > 1:
                # The scale belongs to the whole output row, as at tp=1 and in a quantized checkpoint.
                absmax = get_tp_group().all_reduce(layer.weight.data.abs().amax(dim=1).float(), op="max")
            q, scale = quantize_int8(layer.weight.data, absmax)
            zero = None
        else:
            q, scale, zero = quantize_int4(layer.weight.data, cfg.group_size)
        device = q.device
        layer.quantized = QuantizedWeight(cfg.method, q, scale, zero, cfg.group_size)
        choose_kernels(layer.quantized, layer.params_dtype, device)
        # Only what the chosen kernels read stays in memory: the loaded tensors become empty placeholders.
        for name in ("weight", "weight_q", "weight_scale", "weight_zero"):
            param = getattr(layer, name, None)
            if isinstance(param, nn.Parameter):
                param.data = torch.empty(0, dtype=param.dtype, device=device)

    @staticmethod
    def apply(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = layer.quantized.matmul(x)
        return y if bias is None else y + bias

    @staticmethod
    def weight_bytes(layer: nn.Module) -> int:
        return layer.quantized.nbytes()


def _param(layer: nn.Module, name: str, tensor: torch.Tensor) -> None:
    param = nn.Parameter(tensor, requires_grad=False)
    param.weight_loader = layer.weight_loader
    layer.register_parameter(name, param)
