"""The Llama family: Llama 2/3, Mistral, Qwen2, SmolLM.

Pre-norm decoder blocks, for hidden state ``h``:
    ``a = h + O(attn(RoPE(Q n1(h)), RoPE(K n1(h)), V n1(h)))``,  ``h' = a + W_down(silu(W_gate n2(a)) * W_up n2(a))``
with RMSNorms ``n1``, ``n2``, grouped-query attention (``num_key_value_heads`` K/V heads shared by the query
heads) and a final RMSNorm before the LM head. Mistral adds a sliding attention window; Qwen2 adds a bias to
the Q/K/V projections.

A pipeline stage builds only layers [start, end); the first stage owns the embedding, the last the final
norm and LM head. Stages hand each other ``(hidden, residual)``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from dist_infer.kv_cache_groups import sliding_window_for
from dist_infer.layers.activation import SiluAndMul
from dist_infer.layers.attention import Attention
from dist_infer.layers.layernorm import RMSNorm
from dist_infer.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from dist_infer.layers.rotary import RotaryEmbedding
from dist_infer.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, dtype: torch.dtype, quant_config=None):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias,
                                                       params_dtype=dtype, quant_config=quant_config)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, params_dtype=dtype,
                                           quant_config=quant_config)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, qkv_bias: bool, o_bias: bool, dtype: torch.dtype, quant_config=None):
        super().__init__()
        hidden = config.hidden_size
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or hidden // num_heads
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads, bias=qkv_bias, params_dtype=dtype,
                                          quant_config=quant_config)
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden, bias=o_bias, params_dtype=dtype,
                                        quant_config=quant_config)
        self.attn = Attention(self.qkv_proj.num_heads, head_dim, self.qkv_proj.num_kv_heads, scale=head_dim**-0.5,
                              sliding_window=sliding_window_for(config, layer_idx))

    def forward(self, cos_sin, x: torch.Tensor) -> torch.Tensor:
        T, D = x.shape[0], self.attn.head_dim
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        # Q and K sit side by side in the fused output, so one rotation covers both.
        qk = RotaryEmbedding.apply(qkv[:, : q_size + kv_size].view(T, -1, D), cos_sin).view(T, -1)
        return self.o_proj(self.attn(qk[:, :q_size], qk[:, q_size:], qkv[:, q_size + kv_size:]))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, qkv_bias: bool, dtype: torch.dtype, quant_config=None):
        super().__init__()
        attn_bias = getattr(config, "attention_bias", False)
        self.self_attn = LlamaAttention(config, layer_idx, qkv_bias or attn_bias, attn_bias, dtype, quant_config)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, getattr(config, "mlp_bias", False), dtype,
                            quant_config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, cos_sin, hidden, residual):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(cos_sin, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class MissingLayer(nn.Module):
    """Stands in for a layer that lives on another pipeline stage, keeping layer indices aligned."""


class LlamaModel(nn.Module):
    def __init__(self, config, dtype: torch.dtype, max_positions: int, layer_range: tuple[int, int],
                 is_first: bool, is_last: bool, qkv_bias: bool, quant_config=None):
        super().__init__()
        self.start, self.end = layer_range
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype) if is_first else None
        self.rotary_emb = RotaryEmbedding(config, head_dim, max_positions, dtype)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, qkv_bias, dtype, quant_config) if self.start <= i < self.end else MissingLayer()
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype) if is_last else None

    def forward(self, input_ids, positions, hidden=None, residual=None):
        if self.embed_tokens is not None:
            hidden, residual = self.embed_tokens(input_ids), None
        cos_sin = self.rotary_emb.lookup(positions)
        for layer in self.layers[self.start:self.end]:
            hidden, residual = layer(cos_sin, hidden, residual)
        if self.norm is None:
            return hidden, residual
        return self.norm(hidden, residual)[0]


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class LlamaForCausalLM(nn.Module):
    # Checkpoint projections fused into one parameter here: name -> (fused name, shard id).
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    qkv_bias = False

    def __init__(self, config, dtype: torch.dtype, max_positions: int, layer_range: tuple[int, int] | None = None,
                 is_first: bool = True, is_last: bool = True, quant_config=None):
        """``quant_config``: weight-only quantization of the decoder layers' linears (embedding and LM head
        stay in ``dtype``)."""
        super().__init__()
        self.config = config
        self.layer_range = layer_range or (0, config.num_hidden_layers)
        self.is_first, self.is_last = is_first, is_last
        self.model = LlamaModel(config, dtype, max_positions, self.layer_range, is_first, is_last, self.qkv_bias,
                                quant_config)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, params_dtype=dtype) if is_last else None
        if self.tied and is_first and is_last:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden=None, residual=None):
        """input_ids, positions [T] -> final hidden [T, hidden] on the last stage, else (hidden, residual)."""
        return self.model(input_ids, positions, hidden, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] (fp32 for sampling)."""
        return self.lm_head(hidden).float()

    def expected_shards(self, param_name: str) -> set:
        """The shard ids a parameter must receive before it is fully loaded."""
        module = param_name.rsplit(".", 2)[-2]
        shards = {shard for fused, shard in self.packed_modules.values() if fused == module}
        return shards or {None}

    def checkpoint_targets(self, name: str) -> list[tuple[str, object]] | None:
        """Parameters of this stage that the checkpoint tensor ``name`` fills, as (parameter name, shard id).

        ``[]`` means the tensor belongs elsewhere (another pipeline stage, or a buffer we recompute);
        ``None`` means no model of this shape has such a tensor.
        """
        if name.endswith("rotary_emb.inv_freq"):
            return []
        match = _LAYER.match(name)
        if match:
            if int(match.group(1)) >= self.config.num_hidden_layers:
                return None
            if not self.layer_range[0] <= int(match.group(1)) < self.layer_range[1]:
                return []
            parts = name.split(".")
            fused = self.packed_modules.get(parts[-2])
            if fused is not None:
                return [(".".join(parts[:-2] + [fused[0], parts[-1]]), fused[1])]
            return [(name, None)]
        if name == "model.embed_tokens.weight":
            targets = [(name, None)] if self.is_first else []
            if self.tied and self.is_last and not self.is_first:
                targets.append(("lm_head.weight", None))
            return targets
        if name == "lm_head.weight" or name == "lm_head.bias":
            return [(name, None)] if self.is_last and not self.tied else []
        if name == "model.norm.weight":
            return [(name, None)] if self.is_last else []
        return None


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with a sliding attention window (read from the config per layer)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with a bias on the Q, K and V projections."""

    qkv_bias = True
