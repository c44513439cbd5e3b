"""The completions and chat endpoints: request -> engine requests (one per prompt and choice) -> response.

Every prompt is checked and tokenized before anything is queued, so a bad request is a 400 even when it
asks for a stream; then its ``prompts x n`` sequences are admitted against ``--max-waiting`` (see
``admission``), at most ``max_prompts`` prompts a request. Streams are Server-Sent Events ending with
``data: [DONE]``; when the client goes away the stream is closed, and a non-streamed request is cancelled (the
server watches its connection), either of which aborts its engine requests and frees their KV blocks. With a
``record`` (the server's request log), token counts and time to first token are noted on it, and the texts when
it asks.

With ``stream_options: {"include_usage": true, "continuous_usage_stats": true}`` (vLLM's extension, which
benchmark tools such as guidellm send) every chunk carries ``usage`` too: its choice's prompt tokens and the
tokens that choice has generated so far. The request's fields reach ``SamplingParams`` through
``request_params``; tools, ``tool_choice`` and the answer's tool calls are read and written by ``tool_calls``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from dist_infer.engine.async_llm_engine import AsyncLLMEngine
from dist_infer.entrypoints.chat_utils import chat_prompt
from dist_infer.entrypoints.openai.admission import Admission, Reservation
from dist_infer.entrypoints.openai.completion_logprobs import (
    drop_generated,
    echoed_logprobs,
    engine_max_tokens,
    with_prompt_logprobs,
)
from dist_infer.entrypoints.openai.errors import OpenAIError
from dist_infer.entrypoints.openai.formatting import chat_logprobs, completion_logprobs, usage
from dist_infer.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from dist_infer.entrypoints.openai.request_params import sampling_params
from dist_infer.entrypoints.openai.tool_calls import ChoiceStream, constrained, message, output_parser
from dist_infer.outputs import RequestOutput
from dist_infer.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("dist_infer.server")


@dataclass
class _Choice:
    index: int
    request_id: str
    prompt: dict
    params: SamplingParams
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    output: RequestOutput | None = None


class EventStream:
    """A response's SSE pieces. ``aclose()`` ends them, which aborts their engine requests, then runs ``finish``
    (the admission released, the outputs noted), even if they were never iterated (a client that left before
    the first piece): the server calls it however the response ends."""

    def __init__(self, pieces: AsyncIterator[str], finish: Callable[[], None]):
        self._pieces, self._finish = pieces, finish

    def __aiter__(self):
        return self._pieces.__aiter__()

    async def aclose(self) -> None:
        try:
            await self._pieces.aclose()
        finally:
            self._finish()


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, model_name: str, max_waiting: int | None, metrics,
                 max_prompts: int | None = None, tool_call_parser: str | None = None,
                 enable_auto_tool_choice: bool = False):
        self.engine, self.model_name, self.metrics, self.max_prompts = engine, model_name, metrics, max_prompts
        self.tool_call_parser, self.enable_auto_tool_choice = tool_call_parser, enable_auto_tool_choice
        self.admission = Admission(max_waiting, lambda: engine.num_waiting())

    # ---- shared checks ---------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise OpenAIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                              param="model", code="model_not_found")

    def check_prompt_count(self, count: int) -> None:
        if self.max_prompts is not None and count > self.max_prompts:
            raise OpenAIError(400, f"prompt: {count} prompts in one request; this server takes at most "
                                   f"{self.max_prompts} (--max-prompts-per-request)", param="prompt",
                              code="too_many_prompts")

    def _params(self, req, max_tokens, logprobs: int | None, kind: RequestOutputKind) -> SamplingParams:
        model_config = getattr(self.engine, "model_config", None)
        return sampling_params(req, max_tokens, logprobs, kind, getattr(model_config, "vocab_size", None))

    def _choices(self, prompts: list[dict], req, max_tokens, logprobs, stream: bool, tag: str) -> list[_Choice]:
        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        base = self._params(req, max_tokens, logprobs, kind)
        choices = []
        for p, prompt in enumerate(prompts):
            try:
                processed = self.engine.check_prompt(prompt, base)
            except ValueError as e:
                raise OpenAIError(400, str(e), param="prompt" if tag == "cmpl" else "messages",
                                  code="invalid_prompt") from None
            ready = {"prompt": processed.prompt, "prompt_token_ids": processed.prompt_token_ids}
            for i in range(req.n):
                params = base
                if req.n > 1 and req.seed is not None:  # distinct but reproducible samples per choice
                    params = self._params(req, max_tokens, logprobs, kind)
                    params.seed = (req.seed + i) % 2**64
                index = p * req.n + i
                choices.append(_Choice(index, f"{tag}-{uuid.uuid4().hex}-{index}", ready, params))
        return choices

    # ---- running ---------------------------------------------------------------------------------------
    async def _events(self, choices: list[_Choice], priority: int, reservation: Reservation
                      ) -> AsyncIterator[tuple[_Choice, RequestOutput]]:
        """Outputs of all choices as they come; cancelling the iteration aborts every engine request. A choice
        stops counting as waiting (``reservation``) at its first output."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: _Choice) -> None:
            try:
                async for out in self.engine.generate(choice.prompt, choice.params, choice.request_id, priority):
                    reservation.release(choice.index)
                    await queue.put((choice, out))
            except Exception as e:  # surfaced to the response
                await queue.put((choice, e))
            finally:
                reservation.release(choice.index)
                await queue.put((choice, None))

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            remaining = len(tasks)
            while remaining:
                choice, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield choice, item
        finally:
            for task in tasks:
                task.cancel()

    def _absorb(self, choice: _Choice, out: RequestOutput) -> tuple[str, list[int], list]:
        completion = out.outputs[0]
        choice.text += completion.text
        choice.token_ids += completion.token_ids
        choice.logprobs += completion.logprobs or []
        if out.finished:
            choice.finish_reason = completion.finish_reason
            choice.output = out
            self.metrics.observe_request(out, len(choice.token_ids))
        return completion.text, completion.token_ids, completion.logprobs or []

    async def _collect(self, choices: list[_Choice], priority: int, reservation: Reservation, record=None) -> None:
        """Runs the choices to the end (a non-streamed answer), then notes the outputs on ``record``. Cancelling
        it (the client left) aborts every engine request."""
        try:
            async with contextlib.aclosing(self._events(choices, priority, reservation)) as events:
                async for choice, out in events:
                    self._absorb(choice, out)
        finally:
            self._finish(choices, reservation, record)

    def _finish(self, choices: list[_Choice], reservation: Reservation, record) -> None:
        """A response has ended (answered, failed, or its client left): its admission released, outputs noted."""
        reservation.release_all()
        self._note_outputs(record, choices)

    @staticmethod
    def _note_prompts(record, choices: list[_Choice], n: int, texts) -> None:
        """``texts``: a callable giving the prompt texts, called only when the record keeps text."""
        if record is None:
            return
        record.prompt_tokens = sum(len(c.prompt["prompt_token_ids"]) for c in choices if c.index % n == 0)
        if record.capture_text:
            record.prompts = texts()

    @staticmethod
    def _note_outputs(record, choices: list[_Choice]) -> None:
        if record is None:
            return
        record.completion_tokens = sum(len(c.token_ids) for c in choices)
        ttfts = [c.output.metrics.time_to_first_token for c in choices
                 if c.output is not None and c.output.metrics is not None
                 and c.output.metrics.time_to_first_token is not None]
        record.ttft_s = min(ttfts) if ttfts else None
        if record.capture_text:
            record.completions = [c.text for c in choices]

    @staticmethod
    def _usage(choices: list[_Choice], n: int) -> dict:
        """Each prompt counts once however many choices it has."""
        prompt_tokens = sum(len(c.prompt["prompt_token_ids"]) for c in choices if c.index % n == 0)
        return usage(prompt_tokens, sum(len(c.token_ids) for c in choices))

    @staticmethod
    def _with_usage(chunk: dict, choice: _Choice, continuous: bool) -> dict:
        """``chunk`` with its choice's usage so far, when the request asked for it in every chunk (vLLM)."""
        if continuous:
            chunk["usage"] = usage(len(choice.prompt["prompt_token_ids"]), len(choice.token_ids))
        return chunk

    # ---- /v1/completions ---------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, record=None):
        self.check_model(req.model)
        if req.max_tokens == 0 and not req.echo:
            raise OpenAIError(400, "max_tokens=0 needs echo=true (it scores the prompt only)", param="max_tokens")
        score_only, scored_prompt = req.max_tokens == 0, req.echo and req.logprobs is not None
        if req.best_of is not None and req.best_of != req.n:
            raise OpenAIError(400, "best_of other than n is not supported", param="best_of")
        prompts = _completion_prompts(req.prompt)
        self.check_prompt_count(len(prompts))
        choices = self._choices(prompts, req, engine_max_tokens(req.max_tokens), req.logprobs, req.stream, "cmpl")
        for c in choices if scored_prompt else ():
            c.params = with_prompt_logprobs(c.params, req.logprobs)
        reservation = self.admission.reserve(len(choices))
        response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        tokenizer = self.engine.tokenizer

        def prompt_texts():
            return [c.prompt["prompt"] or tokenizer.decode(c.prompt["prompt_token_ids"])
                    for c in choices if c.index % req.n == 0]

        self._note_prompts(record, choices, req.n, prompt_texts)

        def logprobs_of(token_ids, logprobs, offset, prompt=None, prompt_logprobs=None):
            if req.logprobs is None:
                return None
            completion = completion_logprobs(token_ids, logprobs, req.logprobs, tokenizer, offset)
            if prompt is None:
                return completion
            return echoed_logprobs(prompt["prompt_token_ids"], prompt_logprobs, req.logprobs, tokenizer, completion)

        if not req.stream:
            await self._collect(choices, req.priority, reservation, record)
            for c in choices if score_only else ():
                drop_generated(c)
            body = {"id": response_id, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": [], "usage": self._usage(choices, req.n)}
            for c in choices:
                prefix = (c.prompt["prompt"] or tokenizer.decode(c.prompt["prompt_token_ids"])) if req.echo else ""
                prompt_lps = c.output.prompt_logprobs if c.output is not None else None
                body["choices"].append({"index": c.index, "text": prefix + c.text, "finish_reason": c.finish_reason,
                                        "logprobs": logprobs_of(c.token_ids, c.logprobs, len(prefix),
                                                                c.prompt if scored_prompt else None, prompt_lps)})
            return body

        async def pieces():
            echoed = set()
            async for choice, out in self._events(choices, req.priority, reservation):
                offset = len(choice.text)
                text, token_ids, logprobs = self._absorb(choice, out)
                if score_only:
                    text, token_ids, logprobs = drop_generated(choice)
                prompt = None
                if req.echo:
                    prefix = choice.prompt["prompt"] or tokenizer.decode(choice.prompt["prompt_token_ids"])
                    offset += len(prefix)
                    if choice.index not in echoed:
                        echoed.add(choice.index)
                        text, prompt = prefix + text, (choice.prompt if scored_prompt else None)
                chunk = {"id": response_id, "object": "text_completion", "created": created, "model": self.model_name,
                         "choices": [{"index": choice.index, "text": text, "finish_reason": choice.finish_reason,
                                      "logprobs": logprobs_of(token_ids, logprobs, offset, prompt,
                                                              out.prompt_logprobs)}]}
                yield _sse(self._with_usage(chunk, choice, req.continuous_usage))
            if req.stream_options and req.stream_options.include_usage:
                yield _sse({"id": response_id, "object": "text_completion", "created": created,
                            "model": self.model_name, "choices": [], "usage": self._usage(choices, req.n)})
            yield "data: [DONE]\n\n"

        return EventStream(pieces(), functools.partial(self._finish, choices, reservation, record))

    # ---- /v1/chat/completions ----------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, record=None):
        self.check_model(req.model)
        tokenizer = self.engine.tokenizer
        parser = output_parser(req, self.tool_call_parser, self.enable_auto_tool_choice)  # see tool_calls
        try:
            conversation = req.conversation()
            prompt = chat_prompt(tokenizer, conversation, req.add_generation_prompt,
                                 template_kwargs=req.template_kwargs(), tools=req.template_tools())
        except Exception as e:  # the template rejects the conversation (roles, order, content)
            raise OpenAIError(400, f"messages: {e}", param="messages", code="invalid_messages") from None
        num_top = req.top_logprobs or 0
        logprobs = num_top if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        max_tokens = req.max_completion_tokens or req.max_tokens
        choices = self._choices([prompt], req, max_tokens, logprobs, req.stream, "chatcmpl")
        for c in choices:
            c.params = constrained(c.params, req)  # what tool_choice required / named forces
        reservation = self.admission.reserve(len(choices))
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self._note_prompts(record, choices, req.n, lambda: [f"{m['role']}: {m['content']}" for m in conversation])
        # vLLM's echo: an answer that continues the assistant's last message starts with that message
        echo = conversation[-1]["content"] if req.echo and conversation[-1]["role"] == "assistant" else ""

        if not req.stream:
            await self._collect(choices, req.priority, reservation, record)
            answers = []
            for c in choices:
                answer, finish_reason = message(parser, c.text, c.finish_reason, echo)
                answers.append({"index": c.index, "message": answer, "finish_reason": finish_reason,
                                "logprobs": chat_logprobs(c.token_ids, c.logprobs, num_top, tokenizer)
                                if req.logprobs else None})
            return {"id": response_id, "object": "chat.completion", "created": created, "model": self.model_name,
                    "choices": answers, "usage": self._usage(choices, req.n)}

        def chunk(choice, delta, finish_reason=None, lp=None):
            return _sse(self._with_usage({
                "id": response_id, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                "choices": [{"index": choice.index, "delta": delta, "finish_reason": finish_reason, "logprobs": lp}]},
                choice, req.continuous_usage))

        async def pieces():
            streams = {c.index: ChoiceStream(parser) for c in choices}
            for c in choices:
                yield chunk(c, {"role": "assistant", "content": ""})
                if echo:
                    yield chunk(c, {"content": echo})
            async for choice, out in self._events(choices, req.priority, reservation):
                text, token_ids, lps = self._absorb(choice, out)
                lp = chat_logprobs(token_ids, lps, num_top, tokenizer) if req.logprobs else None
                delta, finish_reason = streams[choice.index].delta(text, choice.finish_reason)
                yield chunk(choice, delta, finish_reason, lp)
            if req.stream_options and req.stream_options.include_usage:
                yield _sse({"id": response_id, "object": "chat.completion.chunk", "created": created,
                            "model": self.model_name, "choices": [],
                            "usage": self._usage(choices, req.n)})
            yield "data: [DONE]\n\n"

        return EventStream(pieces(), functools.partial(self._finish, choices, reservation, record))


def _completion_prompts(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": list(prompt)}]
    return [{"prompt": p} if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompt]


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
