"""``/v1/completions`` with ``echo`` and ``logprobs``: the prompt's tokens scored, then the completion's.

OpenAI's legacy layout (vLLM's too): parallel lists ``tokens``, ``token_logprobs``, ``top_logprobs`` and
``text_offset`` over the prompt's tokens followed by the completion's. The first prompt token has no logprob
(nothing predicts it): ``null`` in ``token_logprobs`` and ``top_logprobs``. ``text_offset`` counts characters
of the returned text: the prompt's tokens from 0, the completion's from the length of the echoed prompt.

The prompt's logprobs come from the engine (``SamplingParams.prompt_logprobs`` = the request's ``logprobs``).
``max_tokens=0`` (allowed only with ``echo``) scores the prompt alone -- what lm-eval-harness's loglikelihood
tasks send: the engine generates one token, since a request must generate at least one, and the response
drops it (no text, no completion tokens, ``finish_reason`` "length").
"""

from __future__ import annotations

import dataclasses

from dist_infer.entrypoints.openai.formatting import completion_logprobs
from dist_infer.outputs import Logprob
from dist_infer.sampling_params import SamplingParams


def engine_max_tokens(max_tokens: int | None) -> int | None:
    """The engine's ``max_tokens`` for a request's: 0 (score the prompt only) generates one token to drop."""
    return 1 if max_tokens == 0 else max_tokens


def with_prompt_logprobs(params: SamplingParams, num_top: int) -> SamplingParams:
    """``params`` asking the engine for the prompt's logprobs and top-``num_top`` at each prompt position."""
    return dataclasses.replace(params, prompt_logprobs=num_top)


def drop_generated(choice) -> tuple[str, list[int], list]:
    """Forgets what a ``max_tokens=0`` choice generated (the one token the engine had to make); returns the empty
    (text, token ids, logprobs) to send in its place."""
    choice.text, choice.token_ids, choice.logprobs = "", [], []
    if choice.finish_reason is not None:
        choice.finish_reason = "length"
    return "", [], []


def echoed_logprobs(prompt_token_ids: list[int], prompt_logprobs: list[dict[int, Logprob] | None] | None,
                    num_top: int, tokenizer, completion: dict | None = None) -> dict:
    """The prompt's entries of the legacy layout, followed by ``completion``'s (a ``completion_logprobs`` result,
    its offsets already counted from the echoed prompt's length). Positions the engine gave no logprob (the
    first) are ``null``."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    entries = list(prompt_logprobs or [])
    offset = 0
    for i, token_id in enumerate(prompt_token_ids):
        entry = entries[i] if i < len(entries) else None
        if entry is None or token_id not in entry:
            text = tokenizer.decode([token_id])
            token_logprobs.append(None)
            tops.append(None)
        else:
            one = completion_logprobs([token_id], [entry], num_top, tokenizer, offset)
            text = one["tokens"][0]
            token_logprobs.append(one["token_logprobs"][0])
            tops.append(one["top_logprobs"][0])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    layout = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
    if completion is not None:
        for name in layout:
            layout[name] = layout[name] + list(completion[name])
    return layout
