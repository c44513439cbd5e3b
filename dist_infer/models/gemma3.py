"""Gemma 3 (text): Gemma 2's block with RMS-normalized queries and keys, and RoPE per layer type.

Each query and key head is normalized, ``q <- (1 + w_q) q / rms(q)`` (likewise ``k``), before RoPE. Local
(sliding-window) layers rotate with their own base (``rope_parameters["sliding_attention"]``, from
``rope_local_base_freq`` in older configs), global layers with ``rope_parameters["full_attention"]`` (which
may be scaled); ``LlamaModel`` tables each. Soft-capping is usually off (the caps are None) but honoured
when set.
"""

from __future__ import annotations

import functools

from dist_infer.layers.layernorm import OffsetRMSNorm
from dist_infer.models.gemma2 import Gemma2ForCausalLM
from dist_infer.models.llama import LlamaAttention


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    attention_class = functools.partial(LlamaAttention, qk_norm=OffsetRMSNorm)
