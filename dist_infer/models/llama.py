"""The Llama family: Llama 2/3, Mistral, Qwen2, SmolLM.

Pre-norm decoder blocks, for hidden state ``h``:
    ``a = h + O(attn(RoPE(Q n1(h)), RoPE(K n1(h)), V n1(h)))``,  ``h' = a + W_down(silu(W_gate n2(a)) * W_up n2(a))``
with RMSNorms ``n1``, ``n2``, grouped-query attention (``num_key_value_heads`` K/V heads shared by the query
heads) and a final RMSNorm before the LM head. Mistral adds a sliding attention window; Qwen2 adds a bias to
the Q/K/V projections.

A pipeline stage builds only layers [start, end); the first stage owns the embedding, the last the final
norm and LM head. Stages hand each other ``(hidden, residual)``.

``LlamaModel`` and ``LlamaAttention`` take the variations of the families built on them (``phi3.py``,
``qwen3.py``, ``gemma2.py``, ``gemma3.py``): the decoder layer, the norm, an embedding scale, per-layer-type
RoPE, a query scale, attention soft-capping and per-head q/k norms.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from dist_infer.kv_cache_groups import sliding_window_for
from dist_infer.layers.activation import SiluAndMul, gated_activation
from dist_infer.layers.attention import Attention
from dist_infer.layers.layernorm import RMSNorm
from dist_infer.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from dist_infer.layers.native_decoder import NativeDecoderLayer
from dist_infer.layers.rotary import RotaryEmbedding, rope_layer_types
from dist_infer.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding

_UNSET = object()


class LlamaMLP(nn.Module):
    """``W_down(act(W_gate x) * W_up x)``: SwiGLU with ``act="silu"``, GeGLU with ``"gelu_pytorch_tanh"``."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, dtype: torch.dtype, quant_config=None,
                 act: str = "silu"):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias,
                                                       params_dtype=dtype, quant_config=quant_config)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, params_dtype=dtype,
                                           quant_config=quant_config)
        self.act_fn = gated_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    """``scale`` defaults to ``head_dim**-0.5``; ``logit_softcap`` caps the attention scores (Gemma 2);
    ``qk_norm`` (a norm class) normalizes each query and key head before RoPE (Qwen3, Gemma 3)."""

    def __init__(self, config, layer_idx: int, qkv_bias: bool, o_bias: bool, dtype: torch.dtype, quant_config=None,
                 scale: float | None = None, logit_softcap: float | None = None, qk_norm=None):
        super().__init__()
        hidden = config.hidden_size
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or hidden // num_heads
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads, bias=qkv_bias, params_dtype=dtype,
                                          quant_config=quant_config)
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden, bias=o_bias, params_dtype=dtype,
                                        quant_config=quant_config)
        self.attn = Attention(self.qkv_proj.num_heads, head_dim, self.qkv_proj.num_kv_heads,
                              scale=head_dim**-0.5 if scale is None else scale,
                              sliding_window=sliding_window_for(config, layer_idx), logit_softcap=logit_softcap)
        self.qk_norm = qk_norm is not None
        if self.qk_norm:
            self.q_norm = qk_norm(head_dim, config.rms_norm_eps, dtype)
            self.k_norm = qk_norm(head_dim, config.rms_norm_eps, dtype)

    def position_qk(self, qk: torch.Tensor, cos_sin) -> torch.Tensor:
        """[T, Hq + Hk, D] query and key heads -> the same, (normalized and) rotated."""
        if self.qk_norm:
            heads = self.qkv_proj.num_heads
            qk = torch.cat([self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])], dim=1)
        return RotaryEmbedding.apply(qk, cos_sin)

    def forward(self, cos_sin, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        # Q and K sit side by side in the fused output, so one rotation covers both. unflatten/flatten, not
        # view(T, -1, D): an empty step (T = 0, replicas in lockstep) leaves no size to infer.
        heads = qkv[:, : q_size + kv_size].unflatten(-1, (-1, self.attn.head_dim))
        qk = self.position_qk(heads, cos_sin).flatten(1)
        return self.o_proj(self.attn(qk[:, :q_size], qk[:, q_size:], qkv[:, q_size + kv_size:]))


def add_and_norm(norm: RMSNorm, hidden: torch.Tensor, residual: torch.Tensor | None):
    """A block's input norm -> (normalized, residual stream): the residual stream starts as the block's input in
    the first layer of a stage and is ``hidden + residual`` in later ones."""
    if residual is None:
        return norm(hidden), hidden
    return norm(hidden, residual)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, qkv_bias: bool, dtype: torch.dtype, quant_config=None,
                 attention_class=LlamaAttention):
        super().__init__()
        attn_bias = getattr(config, "attention_bias", False) or False
        self.self_attn = attention_class(config, layer_idx, qkv_bias or attn_bias, attn_bias, dtype, quant_config)
        self.mlp = self.make_mlp(config, layer_idx, dtype, quant_config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def make_mlp(self, config, layer_idx: int, dtype: torch.dtype, quant_config) -> nn.Module:
        """The feed-forward block of layer ``layer_idx`` (mixture-of-experts models choose per layer)."""
        return LlamaMLP(config.hidden_size, config.intermediate_size, getattr(config, "mlp_bias", False), dtype,
                        quant_config, act=getattr(config, "hidden_act", "silu"))

    def forward(self, cos_sin, hidden, residual):
        native = self.native_decode()
        if native is not None:
            out = native(cos_sin, hidden, residual)
            if out is not None:  # an all-decode step it could take
                return out
        hidden, residual = add_and_norm(self.input_layernorm, hidden, residual)
        hidden = self.self_attn(cos_sin, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


    def native_decode(self) -> NativeDecoderLayer | None:
        """The fused native decode step of this layer, where it is the plain Llama layer computed here (not a
        subclass's variation): it reuses this layer's weights, and itself declines steps it cannot take."""
        native = self.__dict__.get("_native", _UNSET)
        if native is _UNSET:
            attn, mlp = self.self_attn, self.mlp
            plain = (type(self).forward is LlamaDecoderLayer.forward
                     and type(attn).forward is LlamaAttention.forward
                     and type(attn).position_qk is LlamaAttention.position_qk and not attn.qk_norm
                     and attn.attn.logit_softcap is None
                     and type(mlp).forward is LlamaMLP.forward and type(mlp.act_fn) is SiluAndMul
                     and type(self.input_layernorm) is RMSNorm and type(self.post_attention_layernorm) is RMSNorm)
            native = NativeDecoderLayer(attn.attn, attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj,
                                        self.input_layernorm, self.post_attention_layernorm) if plain else None
            self.__dict__["_native"] = native
        return native


class MissingLayer(nn.Module):
    """Stands in for a layer that lives on another pipeline stage, keeping layer indices aligned."""


class LlamaModel(nn.Module):
    """Embedding (first stage), decoder layers [start, end) built by ``make_layer(i)``, final norm (last stage).

    ``embed_scale`` multiplies the embeddings (Gemma: ``sqrt(hidden)``, rounded to the activation dtype as the
    reference does). Layers whose type has RoPE parameters of its own (Gemma 3) get that type's table.
    """

    def __init__(self, config, dtype: torch.dtype, max_positions: int, layer_range: tuple[int, int],
                 is_first: bool, is_last: bool, make_layer: Callable[[int], nn.Module], norm_class=RMSNorm,
                 embed_scale: float | None = None):
        super().__init__()
        self.start, self.end = layer_range
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype) if is_first else None
        self.embed_scale = embed_scale
        rope_types = rope_layer_types(config)
        self.rotary_emb = nn.ModuleDict(
            {t: RotaryEmbedding(config, head_dim, max_positions, dtype, layer_type=t) for t in rope_types}
            if rope_types else {"all": RotaryEmbedding(config, head_dim, max_positions, dtype)})
        self.rope_of_layer = [config.layer_types[i] if rope_types else "all" for i in range(config.num_hidden_layers)]
        self.layers = nn.ModuleList(
            make_layer(i) if self.start <= i < self.end else MissingLayer() for i in range(config.num_hidden_layers)
        )
        self.norm = norm_class(config.hidden_size, config.rms_norm_eps, dtype) if is_last else None

    def forward(self, input_ids, positions, hidden=None, residual=None):
        if self.embed_tokens is not None:
            hidden, residual = self.embed_tokens(input_ids), None
            if self.embed_scale is not None:
                hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        tables = {name: rope.lookup(positions) for name, rope in self.rotary_emb.items()}
        for i in range(self.start, self.end):
            hidden, residual = self.layers[i](tables[self.rope_of_layer[i]], hidden, residual)
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
    attention_class = LlamaAttention
    decoder_layer_class = LlamaDecoderLayer

    def __init__(self, config, dtype: torch.dtype, max_positions: int, layer_range: tuple[int, int] | None = None,
                 is_first: bool = True, is_last: bool = True, quant_config=None):
        """``quant_config``: weight-only quantization of the decoder layers' linears, and with its ``lm_head``
        of the embedding table and LM head (int8); else those stay in ``dtype``."""
        super().__init__()
        self.config = config
        self.layer_range = layer_range or (0, config.num_hidden_layers)
        self.is_first, self.is_last = is_first, is_last
        self.model = self.build_model(config, dtype, max_positions, is_first, is_last, quant_config)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        quantize_table = quant_config is not None and quant_config.lm_head
        if self.model.embed_tokens is not None:
            self.model.embed_tokens.quantize = quantize_table
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, params_dtype=dtype,
                                      quantize=quantize_table) if is_last else None
        if self.tied and is_first and is_last:
            self.lm_head.tie_to(self.model.embed_tokens)

    def build_model(self, config, dtype, max_positions, is_first, is_last, quant_config) -> LlamaModel:
        return LlamaModel(config, dtype, max_positions, self.layer_range, is_first, is_last,
                          lambda i: self.decoder_layer_class(config, i, self.qkv_bias, dtype, quant_config,
                                                             self.attention_class))

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
