"""A validated completions or chat request -> the ``SamplingParams`` of each of its engine requests.

Every sampling field the request sets is passed on under ``SamplingParams``' name (they are vLLM's); a field
it leaves out keeps ``SamplingParams``' default. Token ids in ``logit_bias`` and ``allowed_token_ids`` must be
below the model's vocabulary size (the logits they index have that many entries); anything else
``SamplingParams`` refuses is a 400 naming the field.

Structured outputs come from one of OpenAI's ``response_format`` (``json_object``; ``json_schema``, whose
``schema`` is enforced whether ``strict`` is set or not: a constraint asked for is never silently dropped),
vLLM's ``structured_outputs`` object, or vLLM's older ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
``guided_grammar``; more than one, or an invalid schema, regex or grammar, is a 400 naming the field.
"""

from __future__ import annotations

import re

from dist_infer.entrypoints.openai.errors import OpenAIError
from dist_infer.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

# request field -> SamplingParams field, passed only when the request sets it (not None)
_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "seed", "bad_words", "allowed_token_ids", "prompt_logprobs")
# passed always: the request's defaults are SamplingParams' own
_ALWAYS = ("stop", "stop_token_ids", "ignore_eos", "min_tokens", "skip_special_tokens",
           "spaces_between_special_tokens", "include_stop_str_in_output")


def sampling_params(req, max_tokens: int | None, logprobs: int | None, kind: RequestOutputKind,
                    vocab_size: int | None) -> SamplingParams:
    """``req``: a ``CompletionRequest`` or ``ChatCompletionRequest``; ``max_tokens`` and ``logprobs`` as each
    endpoint reads them from its own fields."""
    given = {name: getattr(req, name) for name in _OPTIONAL if getattr(req, name) is not None}
    given.update({name: getattr(req, name) for name in _ALWAYS})
    if req.logit_bias is not None:
        given["logit_bias"] = {int(token): bias for token, bias in req.logit_bias.items()}
    if vocab_size is not None:
        _check_vocab("logit_bias", given.get("logit_bias", ()), vocab_size)
        _check_vocab("allowed_token_ids", given.get("allowed_token_ids", ()), vocab_size)
    structured = structured_outputs(req)
    if structured is not None:
        given["structured_outputs"] = structured
    try:
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, output_kind=kind, **given)
    except ValueError as e:
        raise OpenAIError(400, str(e), param=str(e).split()[0], code="invalid_value") from None


def _check_vocab(name: str, token_ids, vocab_size: int) -> None:
    bad = next((t for t in token_ids if t >= vocab_size), None)
    if bad is not None:
        raise OpenAIError(400, f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})", param=name,
                          code="invalid_value")


_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs(req) -> StructuredOutputsParams | None:
    """The request's structured-output constraint, or None; a 400 naming the field when it is invalid."""
    specs: dict[str, dict] = {}
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        specs["response_format"] = {"json_object": True}
    elif fmt is not None and fmt.type == "json_schema":
        schema = fmt.json_schema.schema_
        specs["response_format"] = {"json": schema} if schema is not None else {"json_object": True}
    if req.structured_outputs is not None:
        body = req.structured_outputs
        specs["structured_outputs"] = {"json": body.json_, "regex": body.regex, "choice": body.choice,
                                       "grammar": body.grammar, "json_object": body.json_object}
    for name, field in _GUIDED.items():
        if getattr(req, name) is not None:
            specs[name] = {field: getattr(req, name)}
    if len(specs) > 1:
        names = list(specs)
        raise OpenAIError(400, f"{names[1]}: only one structured-output constraint per request, got "
                               f"{', '.join(names)}", param=names[1], code="invalid_value")
    if not specs:
        return None
    (name, fields), = specs.items()
    try:
        return StructuredOutputsParams(**fields)
    except ValueError as e:
        message = str(e)
        if name != "structured_outputs":  # the field the client set, not our parameter's inner name
            message = f"{name}: " + re.sub(r"^structured_outputs(\.\w+)?:? ", "", message)
        raise OpenAIError(400, message, param=name, code="invalid_value") from None
