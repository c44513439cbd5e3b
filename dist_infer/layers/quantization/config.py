"""Which weight-only quantization a model uses (plain Python, no torch: configs import it)."""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
CHECKPOINT_TAG = "dist-infer"


@dataclass(frozen=True)
class QuantConfig:
    """``int8``: symmetric, one scale per output channel, ``w = q * s``.
    ``int4``: asymmetric in groups of ``group_size`` input features, ``w = (q - z) * s`` with q in [0, 15] and
    one (s, z) per output channel and group. ``prequantized``: the checkpoint already stores q, s (and z).
    ``lm_head``: the embedding table and the LM head are quantized too, to int8 per vocabulary row whatever
    ``method`` is (the head is the largest single matrix of a small model, and the most sensitive one)."""

    method: str
    group_size: int = 64
    prequantized: bool = False
    lm_head: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantization={self.method!r} is not supported; use one of {', '.join(METHODS)}")
        if self.method == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"quantization_group_size={self.group_size} is not one of {GROUP_SIZES}")

    @staticmethod
    def from_checkpoint(hf_config) -> QuantConfig | None:
        """The quantization a dist-infer quantized checkpoint was written with (config.json's quantization_config)."""
        data = getattr(hf_config, "quantization_config", None)
        if data is None:
            return None
        if not isinstance(data, dict) or data.get("quant_method") != CHECKPOINT_TAG:
            method = data.get("quant_method") if isinstance(data, dict) else data
            raise ValueError(f"checkpoint quantization {method!r} is not supported; only {CHECKPOINT_TAG!r} checkpoints "
                             f"(from `dist-infer quantize`) load pre-quantized")
        return QuantConfig(data["method"], int(data.get("group_size", 64)), prequantized=True)

    def checkpoint_entry(self) -> dict:
        return {"quant_method": CHECKPOINT_TAG, "method": self.method, "group_size": self.group_size}
