"""Qwen3 (dense): Llama with an RMSNorm over each query and key head before RoPE.

For head vectors ``q_h``, ``k_h`` [D] (``D = head_dim`` from the config, which need not be hidden / heads):
``q_h <- RoPE(n_q(q_h))``, ``k_h <- RoPE(n_k(k_h))`` with RMSNorms ``n_q``, ``n_k`` of size D shared by all heads.
No bias on the Q/K/V projections.
"""

from __future__ import annotations

import torch

from dist_infer.layers.layernorm import RMSNorm
from dist_infer.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(self, config, layer_idx: int, qkv_bias: bool, o_bias: bool, dtype: torch.dtype, quant_config=None):
        super().__init__(config, layer_idx, qkv_bias, o_bias, dtype, quant_config)
        self.q_norm = RMSNorm(self.attn.head_dim, config.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(self.attn.head_dim, config.rms_norm_eps, dtype)

    def rotate_qk(self, qk: torch.Tensor, cos_sin) -> torch.Tensor:
        heads = qk.unflatten(-1, (-1, self.attn.head_dim))
        q_heads = self.qkv_proj.num_heads
        normed = torch.cat([self.q_norm(heads[:, :q_heads]), self.k_norm(heads[:, q_heads:])], dim=1)
        return super().rotate_qk(normed.flatten(1), cos_sin)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    decoder_layer_cls = Qwen3DecoderLayer
