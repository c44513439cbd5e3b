"""Weight-only quantization of the linear layers: int8 per output channel, int4 group-wise."""

from dist_infer.layers.quantization.config import QuantConfig

__all__ = ["QuantConfig"]
