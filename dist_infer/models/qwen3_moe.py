"""Qwen3-MoE: Qwen3 attention (RMSNorm on each query and key head before RoPE) and sparse blocks without a
shared expert (see ``moe``)."""

from __future__ import annotations

from dist_infer.models.moe import MoeDecoderLayer, MoeForCausalLM
from dist_infer.models.qwen3 import Qwen3Attention


class Qwen3MoeDecoderLayer(MoeDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3MoeForCausalLM(MoeForCausalLM):
    decoder_layer_cls = Qwen3MoeDecoderLayer
