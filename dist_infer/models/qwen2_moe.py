"""Qwen2-MoE: Qwen2 attention (bias on Q/K/V) and sparse blocks with a sigmoid-gated shared expert; layers in
``mlp_only_layers`` or off the ``decoder_sparse_step`` keep a dense MLP (see ``moe`` and ``moe_config``)."""

from __future__ import annotations

from dist_infer.models.moe import MoeForCausalLM


class Qwen2MoeForCausalLM(MoeForCausalLM):
    qkv_bias = True
