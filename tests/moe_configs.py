"""Tiny random configs of Qwen3 and the mixture-of-experts families, shared by the MoE tests: name ->
(config factory, bias std)."""

from __future__ import annotations

from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

from conftest import no_special_tokens

COMMON = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, initializer_range=0.3, tie_word_embeddings=False, **no_special_tokens())
FAMILIES = {
    # head_dim 16 is not hidden / heads = 8: it must come from the config.
    "qwen3": (lambda: Qwen3Config(vocab_size=157, intermediate_size=64, head_dim=16, **COMMON), 0.0),
    "mixtral": (lambda: MixtralConfig(vocab_size=151, num_local_experts=8, num_experts_per_tok=2,
                                      intermediate_size=16, **COMMON), 0.0),
    # Layer 1 keeps a dense MLP; the top-k weights are not renormalized (norm_topk_prob=False).
    "qwen2_moe": (lambda: Qwen2MoeConfig(vocab_size=163, num_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                         intermediate_size=40, mlp_only_layers=[1], **COMMON), 0.3),
    # Layers 1 and 3 are sparse (decoder_sparse_step=2), 0 and 2 dense; renormalized top-k.
    "qwen3_moe": (lambda: Qwen3MoeConfig(vocab_size=149, num_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=16, norm_topk_prob=True, intermediate_size=40,
                                         decoder_sparse_step=2, head_dim=16, **COMMON), 0.0),
}
