"""A model's sizes as the planner needs them: parameters, bytes and FLOPs per tensor-parallel rank.

For a dense decoder with hidden size h, q heads H, K/V heads K, head dim d, MLP width I, vocabulary V, one layer
holds ``h (H + 2K) d`` (qkv) + ``H d h`` (o) + ``3 h I`` (gate, up, down) weights; a tp rank holds 1/tp of each
(K/V heads fewer than tp are replicated: each rank keeps one). A token costs 2 FLOPs per weight it meets, and
attention ``4 d H_rank`` FLOPs per query-key pair (scores and the weighted sum). A token's K/V take
``2 K_rank d`` elements per layer on each rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_infer.kv_cache_groups import cdiv

_BITS = {None: None, "int8": 8, "int4": 4}


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    dtype_bytes: int  # activations, embedding, LM head and (unquantized) layer weights
    weight_bits: int | None = None  # weight-only quantization of the layers' linears (None: dtype)
    kv_bytes: int | None = None  # K/V element bytes (None: dtype_bytes)

    @classmethod
    def from_hf_config(cls, hf_config, dtype_bytes: int, quantization: str | None = None,
                       kv_cache_dtype: str = "auto", name: str = "") -> ModelShape:
        from dist_infer.models.moe_config import moe_sizes

        if moe_sizes(hf_config) is not None:
            raise ValueError("the planner models dense decoders; mixture-of-experts models are not supported yet")
        if quantization not in _BITS:
            raise ValueError(f"the planner knows quantization int8, int4 or none, got {quantization!r}")
        heads = hf_config.num_attention_heads
        return cls(name or getattr(hf_config, "name_or_path", "") or hf_config.model_type, hf_config.hidden_size,
                   hf_config.num_hidden_layers, heads, getattr(hf_config, "num_key_value_heads", None) or heads,
                   getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
                   hf_config.intermediate_size, hf_config.vocab_size,
                   bool(getattr(hf_config, "tie_word_embeddings", False)), dtype_bytes, _BITS[quantization],
                   1 if kv_cache_dtype == "int8" else None)

    def kv_heads_per_rank(self, tp: int) -> int:
        return self.kv_heads // tp if self.kv_heads % tp == 0 else 1

    def layer_params_per_rank(self, tp: int) -> int:
        h, d = self.hidden, self.head_dim
        qkv = h * (self.heads // tp + 2 * self.kv_heads_per_rank(tp)) * d
        return qkv + (self.heads // tp) * d * h + 3 * h * (self.intermediate // tp)

    def layer_weight_bytes(self, tp: int) -> float:
        bits = self.weight_bits or 8 * self.dtype_bytes
        # Quantized weights carry a scale (and zero point) per group of 32-128: about 1/16 byte per weight.
        extra = 1 / 16 if self.weight_bits else 0.0
        return self.layer_params_per_rank(tp) * (bits / 8 + extra)

    def vocab_bytes(self, tp: int) -> int:
        """One embedding-sized matrix's slice (the embedding, or an untied LM head)."""
        return cdiv(self.vocab, tp) * self.hidden * self.dtype_bytes

    def stage_weight_bytes(self, tp: int, layers: int, first: bool, last: bool) -> float:
        """A rank's weights for a stage of ``layers`` layers (the embedding on the first stage, the LM head on the
        last; a tied head on a one-stage model is the embedding itself)."""
        total = layers * self.layer_weight_bytes(tp) + (first + last - (first and last and self.tied)) * \
            self.vocab_bytes(tp)
        return total + layers * 2 * self.hidden * self.dtype_bytes  # norms

    def kv_bytes_per_token(self, tp: int, layers: int) -> float:
        """K and V of one token over ``layers`` layers on one rank (int8: plus a 4-byte scale per block head)."""
        element = self.kv_bytes or self.dtype_bytes
        return layers * 2 * self.kv_heads_per_rank(tp) * self.head_dim * element

    def total_params(self) -> int:
        return self.layers * (self.layer_params_per_rank(1) + 2 * self.hidden) + self.vocab * self.hidden * (
            1 if self.tied else 2)
