"""dist-infer: distributed LLM inference with tensor, pipeline and data parallelism."""

from dist_infer.entrypoints.llm import LLM
from dist_infer.outputs import CompletionOutput, Logprob, RequestOutput
from dist_infer.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
