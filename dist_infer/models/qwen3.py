"""Qwen3 (dense): the Llama block with each query and key head RMS-normalized before RoPE,
``q <- w_q q / rms(q)`` (likewise ``k``), an explicit ``head_dim`` and no Q/K/V bias."""

from __future__ import annotations

import functools

from dist_infer.layers.layernorm import RMSNorm
from dist_infer.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_class = functools.partial(LlamaAttention, qk_norm=RMSNorm)
