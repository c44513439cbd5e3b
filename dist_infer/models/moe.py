"""What the mixture-of-experts models share: the sparse feed-forward block and its experts' checkpoint names.

A sparse block computes ``y = sum_j w_j E_j(x)`` over the top-k experts a replicated router ``x G^T`` picks
(``FusedMoE``), plus, with a shared expert (Qwen2-MoE), ``sigmoid(x g^T) * S(x)`` where ``S`` is a dense
SwiGLU MLP and ``g`` is [1, H]. Layers the config leaves dense keep Llama's MLP (see ``moe_config``).

Checkpoints store each expert's projections apart (``mlp.experts.{e}.gate_proj.weight``, ...); they fill the
stacked ``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj`` with shard id ``(e, "gate" | "up" | "down")``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from dist_infer.layers.fused_moe import FusedMoE
from dist_infer.layers.linear import ReplicatedLinear
from dist_infer.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from dist_infer.models.moe_config import is_sparse_layer, moe_sizes

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


class SparseMoeBlock(nn.Module):
    def __init__(self, config, dtype: torch.dtype, quant_config=None):
        super().__init__()
        sizes = moe_sizes(config)
        hidden = config.hidden_size
        self.gate = ReplicatedLinear(hidden, sizes.num_experts, params_dtype=dtype)
        self.experts = FusedMoE(sizes.num_experts, sizes.top_k, hidden, sizes.intermediate_size, sizes.renormalize,
                                dtype)
        self.shared_expert = self.shared_expert_gate = None
        if sizes.shared_intermediate_size:
            self.shared_expert = LlamaMLP(hidden, sizes.shared_intermediate_size, False, dtype, quant_config)
            self.shared_expert_gate = ReplicatedLinear(hidden, 1, params_dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y


class MoeDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, config, layer_idx: int, dtype: torch.dtype, quant_config) -> nn.Module:
        if is_sparse_layer(config, layer_idx):
            return SparseMoeBlock(config, dtype, quant_config)
        return super().make_mlp(config, layer_idx, dtype, quant_config)


class MoeForCausalLM(LlamaForCausalLM):
    decoder_layer_class = MoeDecoderLayer

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint's tensor name in this module's spelling (Mixtral renames)."""
        return name

    def checkpoint_targets(self, name: str) -> list[tuple[str, object]] | None:
        name = self.checkpoint_name(name)
        match = _EXPERT.match(name)
        if match is None:
            return super().checkpoint_targets(name)
        prefix, expert, which = match.groups()
        targets = super().checkpoint_targets(name)  # [] on another stage, None past the last layer
        if not targets:
            return targets
        if int(expert) >= moe_sizes(self.config).num_experts:
            return None
        return [(f"{prefix}.{'down_proj' if which == 'down' else 'gate_up_proj'}", (int(expert), which))]

    def expected_shards(self, param_name: str) -> set:
        prefix, _, leaf = param_name.rpartition(".")
        if not prefix.endswith(".experts"):
            return super().expected_shards(param_name)
        parts = ("down",) if leaf == "down_proj" else ("gate", "up")
        return {(e, part) for e in range(moe_sizes(self.config).num_experts) for part in parts}
