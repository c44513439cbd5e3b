"""Offline batched inference, shaped like vLLM's ``LLM``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tqdm.auto import tqdm

from dist_infer.engine.llm_engine import LLMEngine
from dist_infer.entrypoints.chat_utils import as_conversations, chat_prompt
from dist_infer.entrypoints.prompt_args import per_prompt
from dist_infer.outputs import RequestFailedError, RequestOutput
from dist_infer.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """``LLM(model=None)`` runs the embedded SmolLM2-135M-Instruct; ``model`` may name a local Hugging Face
    folder or a ``.gguf`` file. Every other keyword is an engine argument under vLLM's name
    (``max_num_seqs``, ``kv_cache_memory``, ``block_size``, ...)."""

    def __init__(self, model: str | None = None, dtype: str = "auto", seed: int = 0, max_model_len: int | None = None,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, data_parallel_size: int = 1,
                 distributed_executor_backend: str | None = None, name: str | None = None, **kwargs):
        """With ``name``, the engine runs in a detached named Ray actor that other Ray drivers and jobs reach with
        ``dist_infer.get_handle(name)``; it stays up until ``shutdown()``."""
        engine_kwargs = dict(model=model, dtype=dtype, seed=seed, max_model_len=max_model_len,
                             tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
                             data_parallel_size=data_parallel_size,
                             distributed_executor_backend=distributed_executor_backend, **kwargs)
        self.engine, self.handle = None, None
        if name is not None:
            from dist_infer.entrypoints.ray_service import start_service

            self.handle = start_service(name, **engine_kwargs)
        else:
            self.engine = LLMEngine.from_engine_args(**engine_kwargs)

    def get_tokenizer(self):
        if self.engine is None:
            raise ValueError("the tokenizer lives in the named service; use generate() or chat()")
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """One ``RequestOutput`` per prompt, in the order given, each the request's whole result whatever its
        ``output_kind`` (that setting shapes streamed outputs only). ``prompts``: a string, a
        ``{"prompt_token_ids": [...]}`` dict, or a list of those."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        params = per_prompt(sampling_params, len(prompts), "sampling_params")
        if self.handle is not None:
            return self.handle.generate(prompts, params)
        priorities = per_prompt(priority, len(prompts), "priority") if priority is not None else [0] * len(prompts)
        return self._run(prompts, params, priorities, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True, chat_template: str | None = None
             ) -> list[RequestOutput]:
        """``messages``: one conversation (a list of ``{"role", "content"}`` dicts) or a list of them."""
        if self.handle is not None:
            return self.handle.chat(messages, sampling_params)
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer; this LLM was built with skip_tokenizer_init=True")
        conversations = as_conversations(messages)
        if not conversations:
            raise ValueError("messages is empty: give at least one conversation")
        prompts = []
        for conversation in conversations:
            if not conversation or not all(isinstance(m, dict) and "role" in m and "content" in m for m in conversation):
                raise ValueError("each conversation must be a non-empty list of {'role': ..., 'content': ...} dicts")
            prompts.append(chat_prompt(tokenizer, conversation, add_generation_prompt, chat_template))
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, prompts, params, priorities, use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        # Only each request's final output is kept, so it must be the whole result whatever output_kind the
        # caller asked for (a DELTA request's last output holds only its last piece).
        params = [p if p.output_kind == RequestOutputKind.FINAL_ONLY
                  else dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params]
        ids = [engine.next_request_id() for _ in prompts]
        added = []
        try:
            for request_id, prompt, p, prio in zip(ids, prompts, params, priorities):
                engine.add_request(request_id, prompt, p, prio)
                added.append(request_id)
        except Exception:
            engine.abort_request(added)
            raise
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True) as bar:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.error is not None:  # replica failures it could not outlive: the batch fails
                        engine.abort_request([i for i in ids if i not in results])
                        raise RequestFailedError(output.request_id, output.error)
                    if output.finished:
                        results[output.request_id] = output
                        bar.update(1)
        return [results[i] for i in ids]

    def shutdown(self) -> None:
        if self.handle is not None:
            self.handle.shutdown()
        else:
            self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

