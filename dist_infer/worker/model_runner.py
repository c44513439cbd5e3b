"""Runs one step of the model for a scheduler output: flat token batch in, sampled tokens out."""

from __future__ import annotations

import time

import torch

from dist_infer.config import EngineConfig
from dist_infer.distributed.parallel_state import get_pp_group, get_tp_group
from dist_infer.distributed.pipeline_comm import PipelineComm
from dist_infer.engine.messages import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from dist_infer.layers.attention import Attention, GatherWorkspace
from dist_infer.layers.forward_context import set_forward_context
from dist_infer.layers.sampler import Sampler
from dist_infer.model_loader.model_factory import build_model
from dist_infer.worker.input_builder import build_step_inputs
from dist_infer.worker.request_state import CachedRequestState, build_sampling_batch


class ModelRunner:
    """Runs this worker's part of the model. On a pipeline stage other than the first, the step's input
    activations arrive from the previous stage; other than the last, the output goes on to the next one.
    The last stage computes logits (gathered over tensor-parallel ranks) and its tensor-parallel rank 0
    samples."""

    def __init__(self, config: EngineConfig, device: torch.device, after_each_tensor=None):
        self.config = config
        self.model_config = config.model_config
        self.device = device
        self.block_size = config.cache_config.block_size
        pp, tp = get_pp_group(), get_tp_group()
        self.is_first, self.is_last = pp.is_first, pp.is_last
        self.samples = self.is_last and tp.is_first
        layer_range = config.parallel_config.layer_ranges(self.model_config.num_layers)[pp.rank_in_group]
        self.model = build_model(self.model_config, device, layer_range, self.is_first, self.is_last, after_each_tensor)
        self.pp_comm = None
        self.recv_wait_seconds = 0.0  # time spent waiting for the previous stage inside steps
        if pp.world_size > 1:
            self.pp_comm = PipelineComm(pp, self.model_config.hf_config.hidden_size, self.model_config.torch_dtype,
                                        device)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.sampler = Sampler()
        self.requests: dict[str, CachedRequestState] = {}
        self.kv_caches: list[torch.Tensor] = []

    # ---- KV cache ------------------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        """Bytes one block takes across this worker's layers: 2 (K and V) x layers x block x heads x dim."""
        layer = self.attention_layers[0]
        element = torch.empty(0, dtype=self.model_config.torch_dtype).element_size()
        per_layer = 2 * self.block_size * layer.num_kv_heads * layer.head_dim * element
        return per_layer * len(self.attention_layers)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = []
        workspace = GatherWorkspace(self.model_config.torch_dtype, self.device)
        for layer in self.attention_layers:
            cache = torch.empty(2, num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim,
                                dtype=self.model_config.torch_dtype, device=self.device)
            layer.bind_kv_cache(cache, workspace)
            self.kv_caches.append(cache)
        # Attention reads whole blocks and masks the unused slots; a masked NaN would still poison the
        # output (0 * NaN), so each block is zeroed before first use. On the CPU this is done lazily, as
        # zero-filling the whole pool up front would touch every page of it.
        if self.device.type == "cpu":
            self._block_zeroed = bytearray(num_blocks)
        else:
            for cache in self.kv_caches:
                cache.zero_()
            self._block_zeroed = bytearray(b"\x01") * num_blocks

    def _zero_fresh_blocks(self, block_ids: list[int]) -> None:
        fresh = [b for b in block_ids if not self._block_zeroed[b]]
        if not fresh:
            return
        index = torch.tensor(fresh, dtype=torch.long, device=self.device)
        for cache in self.kv_caches:
            cache.index_fill_(1, index, 0)
        for b in fresh:
            self._block_zeroed[b] = 1

    # ---- request state -------------------------------------------------------------------------------
    def _update_states(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in sched.new_requests:
            generator = None
            if new.sampling_params.seed is not None:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(new.sampling_params.seed % 2**64)
            self.requests[new.req_id] = CachedRequestState(
                new.req_id, list(new.token_ids), new.sampling_params, list(new.block_ids), new.num_computed_tokens,
                generator)
            self._zero_fresh_blocks(new.block_ids)
        for cached in sched.cached_requests:
            self._zero_fresh_blocks(cached.new_block_ids)
            state = self.requests[cached.req_id]
            state.token_ids.extend(cached.new_token_ids)
            if cached.resumed_from_preemption:  # its old blocks went back to the pool
                state.block_ids = list(cached.new_block_ids)
            else:
                state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    # ---- one step ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput | None:
        """The sampled tokens on the sampling rank; None on every other rank."""
        self._update_states(sched)
        states = [self.requests[r] for r in sched.num_scheduled_tokens]
        step = build_step_inputs(states, list(sched.num_scheduled_tokens.values()), self.block_size, self.device)
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
        if not step.sampled:
            return ModelRunnerOutput() if self.samples else None
        if len(step.sampled) < hidden.shape[0]:
            hidden = hidden[step.sample_rows]
        logits = self.model.compute_logits(hidden)  # every tensor-parallel rank joins the gather
        if not self.samples:
            return None
        batch = build_sampling_batch(step.sampled, self.model_config.vocab_size, self.device)
        return self._to_output(step.sampled, self.sampler(logits, batch))

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
