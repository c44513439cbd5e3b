"""dist-infer: distributed LLM inference with tensor, pipeline and data parallelism."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Resolved on first use, so that light modules (the scheduler, the configs) import without torch.
_EXPORTS = {
    "LLM": "dist_infer.entrypoints.llm",
    "LLMEngine": "dist_infer.engine.llm_engine",
    "AsyncLLMEngine": "dist_infer.engine.async_llm_engine",
    "EngineArgs": "dist_infer.engine.arg_utils",
    "SamplingParams": "dist_infer.sampling_params",
    "StructuredOutputsParams": "dist_infer.sampling_params",
    "Client": "dist_infer.entrypoints.client",
    "AsyncClient": "dist_infer.entrypoints.client",
    "ClientError": "dist_infer.entrypoints.client",
    "get_handle": "dist_infer.entrypoints.ray_service",
    "RequestOutputKind": "dist_infer.sampling_params",
    "RequestOutput": "dist_infer.outputs",
    "RequestFailedError": "dist_infer.outputs",
    "CompletionOutput": "dist_infer.outputs",
    "Logprob": "dist_infer.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dist_infer' has no attribute {name!r}")
