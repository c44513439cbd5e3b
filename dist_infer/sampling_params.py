"""Per-request sampling settings, validated when built (plain Python: it travels to every worker)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5


@dataclass
class StructuredOutputsParams:
    """Constrains the output to a language (vLLM's ``StructuredOutputsParams``); exactly one field is set.

    ``json``: a JSON schema (a dict or its JSON text), the output is a JSON document that validates against it
    (strict: properties the schema does not name are not generated); ``json_object``: any JSON object;
    ``regex``: the output full-matches the regular expression; ``choice``: the output is one of the strings;
    ``grammar``: the output is a sentence of the context-free grammar, in xgrammar's EBNF dialect (GBNF-like:
    ``root ::= "a" rule*``, rules ``name ::= ...``, string literals in double quotes, character classes
    ``[a-z]``, ``* + ?`` and ``|``; see https://xgrammar.mlc.ai/docs/tutorials/ebnf_guided_generation.html).

    The spec is compiled (checked) when built: an invalid schema, regex or grammar is a ``ValueError`` naming
    the field. When the output completes the language, only the end-of-sequence token may follow."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs must set exactly one of json, regex, choice, grammar, json_object; "
                             f"got {', '.join(given) or 'none'}")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (a dict or its JSON text), "
                             f"got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or any(not isinstance(c, str) or not c for c in self.choice)):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, "
                                 f"got {self.choice!r}")
            self.choice = list(self.choice)
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}")
        from dist_infer.structured_output.spec import check_spec  # lazily: the grammar engine is a large import

        check_spec(self)


class RequestOutputKind(enum.Enum):
    """What each streamed output holds: everything so far, only what is new, or only the final result."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    Greedy when ``temperature == 0``. Otherwise the logits are divided by ``temperature``, then limited to
    the ``top_k`` most likely tokens (0 or -1: no limit), the smallest set whose probability reaches
    ``top_p``, and tokens with probability at least ``min_p`` times the most likely one's. A
    ``repetition_penalty`` > 1 lowers tokens already in the prompt or output. ``seed`` makes a request's
    samples reproducible whatever else shares its batch.

    Generation stops after ``max_tokens`` tokens (``None``: up to the model's context), at the model's EOS
    token (unless ``ignore_eos``), at any of ``stop_token_ids`` or when the text produces one of ``stop``
    (the stop string is cut from the text unless ``include_stop_str_in_output``). ``logprobs=N`` returns the
    log-probabilities of the N most likely tokens and of the chosen one at every step.

    Penalties and limits (vLLM's names and OpenAI's semantics): ``presence_penalty`` is subtracted from the
    logit of every token that occurs in the output so far, ``frequency_penalty`` times its count there
    (both over generated tokens only, in [-2, 2]); ``min_tokens`` keeps EOS and ``stop_token_ids`` out until
    that many tokens were generated (and a stop string must end after their text); ``logit_bias`` adds a bias
    in [-100, 100] to the given token ids' logits; ``allowed_token_ids`` restricts sampling to those ids;
    ``bad_words`` are strings never generated (each word's token sequence is blocked at its last token; the
    engine tokenizes them into ``bad_words_token_ids``). ``prompt_logprobs=N`` returns, for every prompt token after the first, its
    log-probability and those of the N most likely tokens at its position (``RequestOutput.prompt_logprobs``,
    ``None`` for the first token).

    ``structured_outputs`` (a ``StructuredOutputsParams``) constrains the output to a JSON schema, any JSON
    object, a regex, a choice of strings or a grammar; it cannot be combined with ``ignore_eos`` or
    ``min_tokens`` (the grammar decides where the output ends: once complete, only EOS may follow).

    ``output_kind`` chooses what streamed outputs carry: the whole text so far (``CUMULATIVE``), only the new
    text and tokens (``DELTA``), or nothing until the request finishes (``FINAL_ONLY``).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None
    # Filled in by __post_init__.
    stop_strings: tuple[str, ...] = field(init=False, repr=False, default=())
    # Filled in by the engine from ``bad_words`` (its tokenizer): one token-id sequence per word variant.
    bad_words_token_ids: list[list[int]] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= -1 (0 or -1 disables it), got {self.top_k!r}")
        _check_number("min_p", self.min_p, low=0.0, high=1.0)
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be an int in [-2**63, 2**64) or None, got {self.seed!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool)
                                            or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an int >= 1 or None, got {self.max_tokens!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or self.logprobs < 0):
            raise ValueError(f"logprobs must be an int >= 0 or None, got {self.logprobs!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
        self.stop_strings = tuple(stops)
        ids = list(self.stop_token_ids or [])
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise ValueError(f"stop_token_ids must hold non-negative ints, got {t!r}")
        self.stop_token_ids = ids
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name), low=-2.0, high=2.0)
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must map token ids to biases, got {self.logit_bias!r}")
            bias = {}
            for token, value in self.logit_bias.items():
                token = _token_id("logit_bias", token)
                _check_number(f"logit_bias[{token}]", value, low=-100.0, high=100.0)
                bias[token] = float(value)
            self.logit_bias = bias
        if self.allowed_token_ids is not None:
            ids = [_token_id("allowed_token_ids", t) for t in self.allowed_token_ids]
            if not ids:
                raise ValueError("allowed_token_ids must not be empty (no token could be generated)")
            self.allowed_token_ids = ids
        if self.bad_words is not None:
            words = [self.bad_words] if isinstance(self.bad_words, str) else list(self.bad_words)
            for w in words:
                if not isinstance(w, str) or not w.strip():
                    raise ValueError(f"bad_words must hold non-empty strings, got {w!r}")
            self.bad_words = words
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or isinstance(self.prompt_logprobs, bool) or self.prompt_logprobs < 0):
            raise ValueError(f"prompt_logprobs must be an int >= 0 or None, got {self.prompt_logprobs!r}")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ValueError(f"structured_outputs must be a StructuredOutputsParams, "
                                 f"got {type(self.structured_outputs).__name__}")
            if self.ignore_eos:
                raise ValueError("ignore_eos cannot be combined with structured_outputs (once the output completes "
                                 "the grammar, only EOS may follow)")
            if self.min_tokens:
                raise ValueError("min_tokens cannot be combined with structured_outputs (the grammar decides where "
                                 "the output ends)")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS


def _check_number(name: str, value, low: float | None = None, high: float | None = None) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


def _token_id(name: str, value) -> int:
    """A token id given as an int or, as JSON object keys arrive, a string of digits."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must hold non-negative token ids, got {value!r}")
    return value
