"""Runs one step of the model for a scheduler output: flat token batch in, sampled tokens out."""

from __future__ import annotations

import time

import torch

from dist_infer.config import EngineConfig
from dist_infer.distributed.parallel_state import get_pp_group, get_tp_group
from dist_infer.distributed.pipeline_comm import PipelineComm
from dist_infer.engine.messages import ModelRunnerOutput, PromptLogprobs, SchedulerOutput, TokenLogprobs
from dist_infer.kv_cache_groups import KVCacheGroups
from dist_infer.layers.attention import Attention
from dist_infer.layers.forward_context import set_forward_context
from dist_infer.layers.logprobs import target_logprobs
from dist_infer.layers.sampler import Sampler
from dist_infer.model_loader.model_factory import build_model
from dist_infer.structured_output.batch_mask import StructuredOutputs
from dist_infer.worker.input_builder import StepInputs, build_step_inputs
from dist_infer.worker.kv_cache import KVCacheStore
from dist_infer.worker.request_state import CachedRequestState, build_sampling_batch


class ModelRunner:
    """Runs this worker's part of the model. On a pipeline stage other than the first, the step's input
    activations arrive from the previous stage; other than the last, the output goes on to the next one.
    The last stage computes logits (gathered over tensor-parallel ranks) and its tensor-parallel rank 0
    samples; it also scores the prompt positions the scheduler names (``prompt_logprob_spans``) from the
    step's hidden states, in bounded chunks of rows (``layers.logprobs``).

    Structured outputs: the sampling rank starts filling the grammar mask of the step's sampled rows on a
    background thread before the forward, and joins it once the logits are there (``structured_output``)."""

    def __init__(self, config: EngineConfig, device: torch.device, after_each_tensor=None):
        self.config = config
        self.model_config = config.model_config
        self.device = device
        self.block_size = config.cache_config.block_size
        pp, tp = get_pp_group(), get_tp_group()
        self.is_first, self.is_last = pp.is_first, pp.is_last
        self.samples = self.is_last and tp.is_first
        layer_range = config.parallel_config.layer_ranges(self.model_config.num_layers)[pp.rank_in_group]
        self.model = build_model(self.model_config, device, layer_range, self.is_first, self.is_last, after_each_tensor,
                                 config.parallel_config.enable_expert_parallel)
        self.pp_comm = None
        self.recv_wait_seconds = 0.0  # time spent waiting for the previous stage inside steps
        if pp.world_size > 1:
            self.pp_comm = PipelineComm(pp, self.model_config.hf_config.hidden_size, self.model_config.torch_dtype,
                                        device)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.kv_store = KVCacheStore(self.attention_layers, self.block_size, self.model_config.torch_dtype,
                                     config.cache_config.kv_cache_dtype, device,
                                     KVCacheGroups.from_hf_config(self.model_config.hf_config))
        self.sampler = Sampler()
        self.requests: dict[str, CachedRequestState] = {}
        self.structured = StructuredOutputs(self._load_tokenizer, self.model_config.vocab_size)

    def _load_tokenizer(self):
        """(tokenizer, EOS ids) for the grammar compiler, as the engine loads them (on first use only)."""
        from dist_infer.engine.tokenizer import eos_token_ids, load_tokenizer

        tokenizer = load_tokenizer(self.model_config)
        return tokenizer, eos_token_ids(self.model_config, tokenizer) if tokenizer is not None else frozenset()

    # ---- KV cache ------------------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        return self.kv_store.bytes_per_block()

    def kv_group_bytes_per_block(self) -> list[int]:
        return self.kv_store.group_bytes_per_block()

    def allocate_kv_cache(self, num_blocks: int | list[int]) -> None:
        self.kv_store.allocate(num_blocks)

    # ---- request state -------------------------------------------------------------------------------
    def _update_states(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in sched.new_requests:
            self.requests[new.req_id] = CachedRequestState.from_new(new)
            # Blocks before num_computed_tokens are prefix-cache hits (whole blocks), the rest are to be written.
            self.kv_store.prepare_blocks(new.block_ids, new.num_computed_tokens // self.block_size)
        for cached in sched.cached_requests:
            fresh_from = cached.num_computed_tokens // self.block_size if cached.resumed_from_preemption else 0
            self.kv_store.prepare_blocks(cached.new_block_ids, fresh_from)
            state = self.requests[cached.req_id]
            state.token_ids.extend(cached.new_token_ids)
            if cached.resumed_from_preemption:  # its old blocks went back to the pool
                state.block_ids = [list(ids) for ids in cached.new_block_ids]
            else:
                for table, ids in zip(state.block_ids, cached.new_block_ids):
                    table.extend(ids)
            for table, num_null in zip(state.block_ids, cached.num_null):
                # Blocks given back (they left the sliding window) read the null block from now on. Nulls form a
                # prefix and no real block of a sliding group is 0, so walking back to the last null suffices.
                start = num_null
                while start > 0 and table[start - 1] != 0:
                    start -= 1
                table[start:num_null] = [0] * (num_null - start)
            state.num_computed_tokens = cached.num_computed_tokens

    # ---- one step ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput | None:
        """The sampled tokens on the sampling rank; None on every other rank."""
        self._update_states(sched)
        states = [self.requests[r] for r in sched.num_scheduled_tokens]
        step = build_step_inputs(states, list(sched.num_scheduled_tokens.values()), self.block_size, self.device)
        # The grammar mask is filled while the model runs, not after it.
        pending = None
        if self.samples and self.structured.wanted(step.sampled):
            pending = self.structured.start(step.sampled)
        carried = (None, None)
        if not self.is_first:
            start = time.perf_counter()
            carried = self.pp_comm.recv(step.input_ids.shape[0])
            self.recv_wait_seconds += time.perf_counter() - start
        with set_forward_context(step.metadata):
            hidden = self.model(step.input_ids, step.positions, *carried)
        if not self.is_last:
            self.pp_comm.send(*hidden)
            return None
        prompt_logprobs = self._prompt_logprobs(sched.prompt_logprob_spans, step, hidden)
        if not step.sampled:
            return ModelRunnerOutput(prompt_logprobs=prompt_logprobs) if self.samples else None
        if len(step.sampled) < hidden.shape[0]:
            hidden = hidden[step.sample_rows]
        logits = self.model.compute_logits(hidden)  # every tensor-parallel rank joins the gather
        if not self.samples:
            return None
        grammar = pending.result(self.device) if pending is not None else None
        batch = build_sampling_batch(step.sampled, self.model_config.vocab_size, self.device, grammar)
        out = self._to_output(step.sampled, self.sampler(logits, batch))
        out.prompt_logprobs = prompt_logprobs
        return out

    def _prompt_logprobs(self, spans: dict[str, tuple[int, int]], step: StepInputs,
                         hidden: torch.Tensor) -> dict[str, PromptLogprobs]:
        """Scores prompt positions [lo, hi) of each request in ``spans``: position j from the row of token j - 1,
        which this step computed. Every tensor-parallel rank runs it (the logits are gathered); the sampling
        rank returns the chunks."""
        if not spans:
            return {}
        rows, targets, pieces = [], [], []
        for req_id, (lo, hi) in spans.items():
            state = self.requests[req_id]
            first = step.first_rows[req_id] - state.num_computed_tokens  # the row of token 0, were it here
            rows.extend(range(first + lo - 1, first + hi - 1))
            targets.extend(state.token_ids[lo:hi])
            pieces.append((req_id, lo, hi - lo, state.sampling_params.prompt_logprobs or 0))
        vocab = self.model_config.vocab_size
        result = target_logprobs(hidden[torch.tensor(rows, device=self.device)],
                                 torch.tensor(targets, dtype=torch.long, device=self.device),
                                 max(k for *_, k in pieces), self.model.compute_logits, vocab, keep=self.samples)
        if result is None:
            return {}
        logprobs, ranks = result.logprobs.tolist(), result.ranks.tolist()
        top_ids, top_logprobs = result.top_ids.tolist(), result.top_logprobs.tolist()
        out, at = {}, 0
        for req_id, lo, n, k in pieces:
            k = min(k, vocab)
            out[req_id] = PromptLogprobs(lo, logprobs[at:at + n], ranks[at:at + n],
                                         [ids[:k] for ids in top_ids[at:at + n]],
                                         [lps[:k] for lps in top_logprobs[at:at + n]])
            at += n
        return out

    @staticmethod
    def _to_output(states, result) -> ModelRunnerOutput:
        out = ModelRunnerOutput()
        tokens = result.token_ids.tolist()
        if result.sampled_logprobs is not None:
            sampled_lp = result.sampled_logprobs.tolist()
            ranks = result.sampled_ranks.tolist()
            top_ids = result.topk_ids.tolist() if result.topk_ids is not None else None
            top_lp = result.topk_logprobs.tolist() if result.topk_logprobs is not None else None
        for i, (state, token) in enumerate(zip(states, tokens)):
            out.sampled_token_ids[state.req_id] = token
            n = state.sampling_params.logprobs
            if n is not None:
                out.logprobs[state.req_id] = TokenLogprobs(
                    sampled_lp[i], ranks[i], top_ids[i][:n] if n else [], top_lp[i][:n] if n else [])
        return out
