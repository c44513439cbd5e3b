"""Qwen3-MoE: Qwen3 attention (RMSNorm on each query and key head before RoPE) and sparse blocks without a
shared expert (see ``moe``)."""

from __future__ import annotations

from dist_infer.models.moe import MoeForCausalLM
from dist_infer.models.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(MoeForCausalLM):
    attention_class = Qwen3ForCausalLM.attention_class
