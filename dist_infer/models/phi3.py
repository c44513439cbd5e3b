"""Phi-3 (and Phi-3.5 / Phi-4-mini, which share its architecture): the Llama block with fused checkpoints.

The decoder is Llama's (pre-norm, grouped-query attention, SwiGLU), but the checkpoint stores the projections
already fused: ``qkv_proj`` [(H + 2 Hk) D, hidden] = [q; k; v] and ``gate_up_proj`` [2 I, hidden] = [gate; up].
Each goes whole to our fused layer (shard id None), whose loader reads only this rank's rows of every part.
RoPE is often LongRoPE (``short_factor`` / ``long_factor``), sometimes partial (Phi-4-mini): see
``layers/rotary.py`` for which factor set a context gets.
"""

from __future__ import annotations

from dist_infer.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    # Checkpoint and parameter names coincide: qkv_proj and gate_up_proj arrive fused.
    packed_modules: dict = {}
