"""Turns the engine core's new tokens into ``RequestOutput``s: text, stop strings, logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from dist_infer.engine.detokenizer import IncrementalDetokenizer
from dist_infer.engine.messages import EngineCoreOutput, TokenLogprobs
from dist_infer.outputs import CompletionOutput, Logprob, RequestOutput
from dist_infer.sampling_params import SamplingParams


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.params.stop_strings), default=0)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
        state = RequestState(request_id, prompt, prompt_token_ids, params, detok)
        if params.logprobs is not None:
            state.logprobs, state.cumulative_logprob = [], 0.0
        self.requests[request_id] = state

    def abort(self, request_id: str) -> RequestOutput | None:
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        return self._make_output(state, "abort", None, finished=True)

    def process(self, core_outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the outputs to hand out and the ids of requests that a stop string ended."""
        results, stopped = [], []
        for core in core_outputs:
            state = self.requests.get(core.req_id)
            if state is None:
                continue
            state.token_ids.extend(core.new_token_ids)
            if state.logprobs is not None:
                for token, lp in zip(core.new_token_ids, core.new_logprobs):
                    state.logprobs.append(self._logprob_dict(token, lp))
                    state.cumulative_logprob += lp.sampled_logprob
            finish_reason, stop_reason = core.finish_reason, core.stop_reason
            if state.detokenizer is not None:
                delta = state.detokenizer.step(core.new_token_ids)
                hit = self._append_text(state, delta)
                if hit is not None:
                    if finish_reason is None:  # the engine core still holds it
                        stopped.append(core.req_id)
                    finish_reason, stop_reason = "stop", hit
            finished = finish_reason is not None
            if finished:
                del self.requests[core.req_id]
            results.append(self._make_output(state, finish_reason, stop_reason, finished))
        return results, stopped

    @staticmethod
    def _append_text(state: RequestState, delta: str) -> str | None:
        """Adds ``delta``; when it completes a stop string, cuts the text there and returns that string."""
        params = state.params
        if not delta:
            return None
        previous = len(state.text)
        state.text += delta
        if not params.stop_strings:
            return None
        search_from = max(0, previous - state.max_stop_len + 1)
        best = None
        for stop in params.stop_strings:
            at = state.text.find(stop, search_from)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        state.text = state.text[: at + len(stop) if params.include_stop_str_in_output else at]
        return stop

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
        completion = CompletionOutput(
            index=0, text=text, token_ids=list(state.token_ids),
            cumulative_logprob=state.cumulative_logprob,
            logprobs=list(state.logprobs) if state.logprobs is not None else None,
            finish_reason=finish_reason, stop_reason=stop_reason,
        )
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, [completion], finished)
