"""A request body -> a JSON object, or a 400 that says what is wrong with it.

Beyond "is it JSON": nesting deeper than ``MAX_DEPTH`` is refused (a body of 100,000 ``[`` would otherwise
overflow the parser's recursion, a 500), and so is any string that is not valid Unicode (JSON's ``"\\ud800"``
decodes to a lone surrogate, which has no UTF-8 form, so no tokenizer or log line can take it). Both are
checked in one pass over the decoded value, with an explicit stack (no recursion of our own).
"""

from __future__ import annotations

import json

from dist_infer.entrypoints.openai.errors import OpenAIError

MAX_DEPTH = 64  # the API's own bodies nest 5 deep (messages -> message -> content -> part -> text)


def decode_json_object(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenAIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise _too_deep() from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the body must be a JSON object", code="invalid_json")
    _check(data)
    return data


def _check(data) -> None:
    stack = [(data, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            raise _too_deep()
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path)
                stack.append((item, depth + 1, f"{path}.{key}" if path else key))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, f"{path}[{i}]") for i, item in enumerate(value))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = path or "the body"
        raise OpenAIError(400, f"{where}: invalid Unicode (a lone surrogate {text[e.start]!r} at character "
                               f"{e.start}); text must be valid UTF-8", param=path or None,
                          code="invalid_unicode") from None


def _too_deep() -> OpenAIError:
    return OpenAIError(400, f"the body's JSON is nested more than {MAX_DEPTH} levels deep", code="invalid_json")
