"""Which checkpoint tensors weight-only quantization stores quantized: the decoder layers' q/k/v/o and
gate/up/down projection weights, by their Hugging Face names. Shared by ``dist-infer quantize`` and the GGUF
loader (plain Python, no torch)."""

from __future__ import annotations

import re

LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")
