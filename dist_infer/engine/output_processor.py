"""Turns the engine core's new tokens into ``RequestOutput``s: text, stop strings, logprobs, timings.

Prompt logprobs arrive in chunks, one per step that computed part of the prompt, in prompt order; they are
joined here (a position already held is not added again) and handed out with the first token: in every output
of a cumulative or final-only request, in the first output of a delta one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from dist_infer.engine.detokenizer import IncrementalDetokenizer
from dist_infer.engine.messages import EngineCoreOutput, PromptLogprobs, TokenLogprobs
from dist_infer.engine.stats import RequestMetrics
from dist_infer.outputs import CompletionOutput, Logprob, RequestOutput
from dist_infer.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    metrics: RequestMetrics
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    num_cached_tokens: int = 0
    # With prompt_logprobs: one entry per prompt token received so far (None for the first).
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # What earlier DELTA outputs already carried.
    sent_tokens: int = 0
    sent_chars: int = 0
    sent_prompt_logprobs: bool = False

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.params.stop_strings), default=0)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float | None = None) -> None:
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
        metrics = RequestMetrics(time.monotonic() if arrival_time is None else arrival_time)
        state = RequestState(request_id, prompt, prompt_token_ids, params, detok, metrics)
        if params.logprobs is not None:
            state.logprobs, state.cumulative_logprob = [], 0.0
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        self.requests[request_id] = state

    def abort(self, request_id: str) -> RequestOutput | None:
        """Forgets the request; returns its final output (finish_reason "abort"), or None if it was unknown."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        state.metrics.finished_time = time.monotonic()
        return self._make_output(state, "abort", None, finished=True)

    def fail(self, request_id: str, reason: str) -> RequestOutput | None:
        """Forgets the request; returns its final output (finish_reason "error", ``error`` saying why)."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        state.metrics.finished_time = time.monotonic()
        output = self._make_output(state, "error", None, finished=True)
        output.error = reason
        return output

    def process(self, core_outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the outputs to hand out and the ids of requests that a stop string ended."""
        results, stopped = [], []
        now = time.monotonic()
        for core in core_outputs:
            state = self.requests.get(core.req_id)
            if state is None:
                continue
            if core.prompt_logprobs is not None and state.prompt_logprobs is not None:
                self._add_prompt_logprobs(state, core.prompt_logprobs)
            if not core.new_token_ids and core.finish_reason is None:
                continue  # only a prompt chunk's logprobs: nothing to hand out before the first token
            state.metrics.record_tokens(now)
            state.num_cached_tokens = core.num_cached_tokens
            state.token_ids.extend(core.new_token_ids)
            if state.logprobs is not None:
                for token, lp in zip(core.new_token_ids, core.new_logprobs):
                    state.logprobs.append(self._logprob_dict(token, lp))
                    state.cumulative_logprob += lp.sampled_logprob
            finish_reason, stop_reason = core.finish_reason, core.stop_reason
            if state.detokenizer is not None:
                hit = self._detokenize(state, core.new_token_ids)
                if hit is not None:
                    if finish_reason is None:  # the engine core still holds it
                        stopped.append(core.req_id)
                    finish_reason, stop_reason = "stop", hit
            finished = finish_reason is not None
            if finished:
                state.metrics.finished_time = now
                del self.requests[core.req_id]
            elif state.params.output_kind == RequestOutputKind.FINAL_ONLY:
                continue
            results.append(self._make_output(state, finish_reason, stop_reason, finished))
        return results, stopped

    def _detokenize(self, state: RequestState, new_token_ids: list[int]) -> str | None:
        """Appends the new tokens' text; returns the stop string it completed, if any. The text of the first
        ``min_tokens`` output tokens cannot complete one (vLLM: a stop string must end after it)."""
        before = len(state.token_ids) - len(new_token_ids)  # outputs before these (token_ids has them)
        held = min(len(new_token_ids), max(0, state.params.min_tokens - before))
        if held:  # added unsearched; each search below starts where a stop string would end past it
            state.text += state.detokenizer.step(new_token_ids[:held])
        return self._append_text(state, state.detokenizer.step(new_token_ids[held:]))

    @staticmethod
    def _append_text(state: RequestState, delta: str) -> str | None:
        """Adds ``delta``; when it completes a stop string (one that ends inside ``delta``), cuts the text there
        and returns that string."""
        params = state.params
        if not delta:
            return None
        previous = len(state.text)
        state.text += delta
        if not params.stop_strings:
            return None
        best = None
        for stop in params.stop_strings:
            at = state.text.find(stop, max(0, previous - len(stop) + 1))
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        state.text = state.text[: at + len(stop) if params.include_stop_str_in_output else at]
        return stop

    def _add_prompt_logprobs(self, state: RequestState, chunk: PromptLogprobs) -> None:
        have = len(state.prompt_logprobs)
        if chunk.start > have:
            raise RuntimeError(f"request {state.request_id}: prompt logprobs from position {chunk.start} arrived "
                               f"before those of position {have}")
        for i in range(have - chunk.start, len(chunk.logprobs)):
            token = state.prompt_token_ids[chunk.start + i]
            state.prompt_logprobs.append(self._logprob_dict(token, TokenLogprobs(
                chunk.logprobs[i], chunk.ranks[i], chunk.top_ids[i], chunk.top_logprobs[i])))

    def _logprob_dict(self, token: int, lp: TokenLogprobs) -> dict[int, Logprob]:
        ids = list(lp.top_ids)
        values = list(lp.top_logprobs)
        ranks = list(range(1, len(ids) + 1))
        if token not in ids:
            ids.append(token)
            values.append(lp.sampled_logprob)
            ranks.append(lp.sampled_rank)
        texts = [self.tokenizer.decode([t]) for t in ids] if self.tokenizer is not None else [None] * len(ids)
        return {t: Logprob(v, r, s) for t, v, r, s in zip(ids, values, ranks, texts)}

    @staticmethod
    def _make_output(state: RequestState, finish_reason, stop_reason, finished: bool) -> RequestOutput:
        text = state.text
        if not finished and state.params.stop_strings:
            # Hold back what could still turn out to be the start of a stop string.
            text = text[: max(0, len(text) - state.max_stop_len + 1)]
        token_ids, logprobs, prompt_logprobs = state.token_ids, state.logprobs, state.prompt_logprobs
        if state.params.output_kind == RequestOutputKind.DELTA:
            if state.sent_prompt_logprobs:
                prompt_logprobs = None
            state.sent_prompt_logprobs = True
            text, token_ids = text[state.sent_chars:], token_ids[state.sent_tokens:]
            logprobs = logprobs[state.sent_tokens:] if logprobs is not None else None
            state.sent_chars += len(text)
            state.sent_tokens += len(token_ids)
        completion = CompletionOutput(
            index=0, text=text, token_ids=list(token_ids),
            cumulative_logprob=state.cumulative_logprob,
            logprobs=list(logprobs) if logprobs is not None else None,
            finish_reason=finish_reason, stop_reason=stop_reason,
        )
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids,
                             prompt_logprobs=list(prompt_logprobs) if prompt_logprobs is not None else None,
                             outputs=[completion], finished=finished, num_cached_tokens=state.num_cached_tokens,
                             metrics=state.metrics)
