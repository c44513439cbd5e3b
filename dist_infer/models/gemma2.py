"""Gemma 2: a pre- and post-norm decoder with soft-capped logits.

For hidden state ``h`` (first layer: ``h = sqrt(hidden) * embed(t)``, the factor rounded to the activation
dtype), with RMSNorms ``n(x) = (1 + w) x / rms(x)``:
    ``a = h + n2(O(attn(RoPE(Q n1(h)), RoPE(K n1(h)), V n1(h))))``,
    ``h' = a + n4(W_down(gelu_tanh(W_gate n3(a)) * W_up n3(a)))``.
Attention scores are ``c_a tanh(q k^T s / c_a)`` with ``s = query_pre_attn_scalar**-0.5`` and cap
``c_a = attn_logit_softcapping``; layers alternate sliding-window and global attention (``layer_types``,
``sliding_window``). The logits are ``c_f tanh(W_E h / c_f)`` (``final_logit_softcapping``) with the LM head
tied to the embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_infer.layers.layernorm import OffsetRMSNorm
from dist_infer.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, LlamaModel, add_and_norm


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(x / cap)``; ``x`` unchanged without a cap."""
    return x if cap is None else torch.tanh(x / cap) * cap


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, attention_class, dtype: torch.dtype, quant_config=None):
        super().__init__()
        bias = getattr(config, "attention_bias", False)
        self.self_attn = attention_class(config, layer_idx, bias, bias, dtype, quant_config,
                                         scale=config.query_pre_attn_scalar**-0.5,
                                         logit_softcap=getattr(config, "attn_logit_softcapping", None))
        act = getattr(config, "hidden_activation", None) or config.hidden_act
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, False, dtype, quant_config, act=act)
        (self.input_layernorm, self.post_attention_layernorm, self.pre_feedforward_layernorm,
         self.post_feedforward_layernorm) = (OffsetRMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
                                             for _ in range(4))

    def forward(self, cos_sin, hidden, residual):
        """The residual stream travels beside the block's output; the next norm adds them."""
        hidden, residual = add_and_norm(self.input_layernorm, hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(cos_sin, hidden))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma2ForCausalLM(LlamaForCausalLM):
    attention_class = LlamaAttention

    def build_model(self, config, dtype, max_positions, is_first, is_last, quant_config) -> LlamaModel:
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention=True (an embedding model) is not supported; "
                             "only causal Gemma checkpoints generate text")
        return LlamaModel(config, dtype, max_positions, self.layer_range, is_first, is_last,
                          lambda i: GemmaDecoderLayer(config, i, self.attention_class, dtype, quant_config),
                          norm_class=OffsetRMSNorm, embed_scale=config.hidden_size**0.5)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> soft-capped [N, vocab] (fp32)."""
        return softcap(super().compute_logits(hidden), getattr(self.config, "final_logit_softcapping", None))
