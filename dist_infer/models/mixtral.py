"""Mixtral: Llama attention (with an optional sliding window) and a sparse block in every layer: top-k of
``num_local_experts`` experts of ``intermediate_size``, weights always renormalized (see ``moe``).

Its checkpoints call the block ``block_sparse_moe`` and an expert's gate/down/up projections ``w1``/``w2``/``w3``.
"""

from __future__ import annotations

import re

from dist_infer.models.moe import MoeForCausalLM

_RENAMES = [(re.compile(r"\.block_sparse_moe\."), ".mlp."), (re.compile(r"\.w1\.weight$"), ".gate_proj.weight"),
            (re.compile(r"\.w2\.weight$"), ".down_proj.weight"), (re.compile(r"\.w3\.weight$"), ".up_proj.weight")]


class MixtralForCausalLM(MoeForCausalLM):
    def checkpoint_name(self, name: str) -> str:
        for pattern, replacement in _RENAMES:
            name = pattern.sub(replacement, name)
        return name
