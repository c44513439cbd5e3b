"""The OpenAI and vLLM fields and routes that real clients send (issue 13): what each request field becomes in
the engine's ``SamplingParams`` (read by a spy on the engine's ``generate``), the 400s for bad values and for
fields the server does not support, unknown fields ignored and named in ``x-ignored-fields``, usage in every
streamed chunk (``continuous_usage_stats``), ``/tokenize``, ``/detokenize``, ``/version`` and ``/v1/models``.

The server runs in this process (a real engine on a tiny random model with SmolLM2's tokenizer, served by
uvicorn on a thread), so the spy sees each engine request. References: the official ``openai`` client, Hugging
Face's tokenizer and chat template, the project's ``pyproject.toml``.
"""

from __future__ import annotations

import json
import logging
import tomllib
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from server_helpers import InProcessServer, with_chat_template
from dist_infer.sampling_params import SamplingParams

KEY = "sk-extensions-test"
MODEL = "tiny"
MAX_MODEL_LEN = 256
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "Hello there"}]
# SmolLM2's template with one template variable, so that chat_template_kwargs can be seen to reach it.
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
            "{% if enable_thinking %}{{ '<think>\n' }}{% endif %}{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tiny_llama_with_tokenizer, tmp_path_factory) -> str:
    return with_chat_template(tiny_llama_with_tokenizer, tmp_path_factory.mktemp("ext") / "tiny", TEMPLATE)


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def served(model_dir):
    from dist_infer.entrypoints.openai.api_server import ServerSettings

    served = InProcessServer(ServerSettings(MODEL, KEY), model=model_dir, kv_cache_memory=1 << 22, max_model_len=MAX_MODEL_LEN)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0)


def _last_params(served) -> SamplingParams:
    return served.calls[-1][1]


def _post(served, path: str, body: dict) -> httpx.Response:
    return httpx.post(served.url + path, json=body, headers=AUTH, timeout=60)


# ---- request fields -> SamplingParams ----------------------------------------------------------------------

EXTENSIONS = dict(top_k=7, min_p=0.05, repetition_penalty=1.1, min_tokens=2, ignore_eos=True,
                  skip_special_tokens=False, spaces_between_special_tokens=False, include_stop_str_in_output=True,
                  bad_words=["never", "ever"], allowed_token_ids=[5, 6, 7, 8], prompt_logprobs=3,
                  stop_token_ids=[9])


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_every_field_reaches_sampling_params(served, client, endpoint):
    openai_fields = dict(temperature=0.7, top_p=0.9, presence_penalty=0.5, frequency_penalty=-0.25,
                         logit_bias={"5": 10, "7": -100}, seed=11, stop=["zzz"], max_tokens=4)
    if endpoint == "chat":
        client.chat.completions.create(model=MODEL, messages=HELLO, extra_body=EXTENSIONS, **openai_fields)
    else:
        client.completions.create(model=MODEL, prompt="Hello there", extra_body=EXTENSIONS, **openai_fields)
    params = _last_params(served)
    expected = {**EXTENSIONS, **openai_fields, "logit_bias": {5: 10.0, 7: -100.0}}
    assert {name: getattr(params, name) for name in expected} == expected


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_fields_left_out_keep_sampling_params_defaults(served, client, endpoint):
    if endpoint == "chat":
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    else:
        client.completions.create(model=MODEL, prompt="Hello there", max_tokens=2)
    params, default = _last_params(served), SamplingParams()
    names = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
             "logit_bias", "min_tokens", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
             "include_stop_str_in_output", "bad_words", "allowed_token_ids", "prompt_logprobs", "seed"]
    assert {n: getattr(params, n) for n in names} == {n: getattr(default, n) for n in names}


BAD_VALUES = [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"49152": 1}}, "logit_bias"),  # the vocabulary has 49152 ids: 0..49151
    ({"allowed_token_ids": []}, "allowed_token_ids"), ({"allowed_token_ids": [49152]}, "allowed_token_ids"),
    ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
    ({"min_tokens": 5, "max_tokens": 3}, "min_tokens"), ({"min_tokens": -1}, "min_tokens"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"), ({"bad_words": [" "]}, "bad_words"),
    ({"skip_special_tokens": "no"}, "skip_special_tokens"),
    ({"stream_options": {"continuous_usage_stats": "yes"}}, "stream_options.continuous_usage_stats"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    ({"add_generation_prompt": True, "continue_final_message": True}, None),
]


@pytest.mark.parametrize("fields,param", BAD_VALUES, ids=[json.dumps(f) for f, _ in BAD_VALUES])
def test_bad_values_are_400_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, extra_body={"max_tokens": 4, **fields})
    if param is not None:
        assert caught.value.param == param and param in caught.value.message
    else:
        assert all(name in caught.value.message for name in fields)


REFUSED = [
    ("chat", {"functions": [{"name": "f"}]}), ("chat", {"function_call": "auto"}),
    ("chat", {"modalities": ["text", "audio"]}), ("chat", {"audio": {"voice": "alloy", "format": "wav"}}),
    ("chat", {"prediction": {"type": "content", "content": "x"}}),
    ("chat", {"chat_template": "{{ messages }}"}), ("chat", {"web_search_options": {}}),
    ("completions", {"suffix": "the end"}), ("completions", {"best_of": 3}),
]


@pytest.mark.parametrize("endpoint,fields", REFUSED, ids=[f"{e}-{next(iter(f))}" for e, f in REFUSED])
def test_unsupported_fields_are_refused_by_name(served, endpoint, fields):
    if endpoint == "chat":
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 2, **fields}
    else:
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **fields}
    before = len(served.calls)
    reply = _post(served, "/v1/chat/completions" if endpoint == "chat" else "/v1/completions", body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    name = next(iter(fields))
    assert error["param"] == name and name in error["message"] and "not supported" in error["message"], error
    assert len(served.calls) == before  # refused before anything reached the engine


def test_no_op_values_of_unsupported_fields_are_accepted(served):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2, "response_format": {"type": "text"}, "tools": [],
            "tool_choice": "none", "modalities": ["text"], "functions": None}
    reply = _post(served, "/v1/chat/completions", body)
    assert reply.status_code == 200, reply.text
    assert "x-ignored-fields" not in reply.headers


# ---- unknown fields ----------------------------------------------------------------------------------------

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_unknown_fields_are_ignored_named_in_a_header_and_logged_once(served, client):
    vendor = f"vendor_{uuid.uuid4().hex[:8]}"  # a name no earlier request used: its warning is still due
    body = {"model": MODEL, "max_tokens": 2, vendor: {"any": "thing"}, "stream": True,
            "stream_options": {"include_usage": True, "extra_knob": 1},
            "messages": [{"role": "user", "content": "Hi", "reasoning_content": "x"}]}
    records, logger = _Records(), logging.getLogger("dist_infer.server")
    logger.addHandler(records)
    try:
        for _ in range(2):
            with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, headers=AUTH,
                              timeout=60) as reply:
                assert reply.status_code == 200
                lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            named = [n.strip() for n in reply.headers["x-ignored-fields"].split(",")]
            assert sorted(named) == sorted([vendor, "stream_options.extra_knob", "messages[].reasoning_content"])
    finally:
        logger.removeHandler(records)
    warnings = [m for m in records.messages if vendor in m]
    assert len(warnings) == 1 and "stream_options.extra_knob" in warnings[0]

    raw = client.completions.with_raw_response.create(model=MODEL, prompt="Hi", max_tokens=2,
                                                      extra_body={vendor: 1})
    assert raw.headers["x-ignored-fields"] == vendor and raw.parse().choices[0].text is not None
    plain = client.completions.with_raw_response.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert "x-ignored-fields" not in plain.headers


def test_unprintable_field_names_stay_out_of_the_header(served):
    reply = _post(served, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "bad\r\nname": 1,
                                              "ok_name": 2})
    assert reply.status_code == 200 and reply.headers["x-ignored-fields"] == "ok_name, <1 unprintable>"


# ---- usage in every chunk ------------------------------------------------------------------------------------

@pytest.mark.parametrize("continuous", [True, False])
def test_continuous_usage_stats_in_chat_streams(client, hf_tokenizer, continuous):
    options = {"include_usage": True, **({"continuous_usage_stats": True} if continuous else {})}
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, stream=True,
                                                 stream_options=options, extra_body={"ignore_eos": True}))
    prompt_tokens = len(_templated(hf_tokenizer, HELLO, add_generation_prompt=True))
    final = chunks[-1]
    assert final.choices == [] and final.usage.prompt_tokens == prompt_tokens and final.usage.completion_tokens == 6
    with_choices = [c for c in chunks if c.choices]
    if not continuous:
        assert all(c.usage is None for c in with_choices)
        return
    counts = [c.usage.completion_tokens for c in with_choices]
    assert all(c.usage.prompt_tokens == prompt_tokens for c in with_choices)
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in with_choices)
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] == 6  # role chunk first, the last has all


def test_continuous_usage_stats_in_completion_streams(client, hf_tokenizer):
    chunks = list(client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=5, stream=True, n=2,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True}))
    prompt_tokens = len(hf_tokenizer.encode("Once upon a time"))
    seen = {0: [], 1: []}
    for chunk in chunks[:-1]:
        assert chunk.usage.prompt_tokens == prompt_tokens  # each choice's own prompt
        seen[chunk.choices[0].index].append(chunk.usage.completion_tokens)
    assert all(counts == sorted(counts) and counts[-1] == 5 for counts in seen.values()), seen
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == prompt_tokens


# ---- chat templating: echo, continue_final_message, chat_template_kwargs ------------------------------------

def _templated(hf_tokenizer, messages, **kwargs) -> list[int]:
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    return hf_tokenizer.encode(text, add_special_tokens=False)


def test_chat_template_kwargs_reach_the_template(served, client, hf_tokenizer):
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2,
                                   extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    thinking = served.calls[-1][0]["prompt_token_ids"]
    assert thinking == _templated(hf_tokenizer, HELLO, add_generation_prompt=True, enable_thinking=True)
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert served.calls[-1][0]["prompt_token_ids"] == _templated(hf_tokenizer, HELLO, add_generation_prompt=True)
    assert thinking != served.calls[-1][0]["prompt_token_ids"]


def test_echo_continues_the_last_assistant_message(served, client, hf_tokenizer):
    messages = [*HELLO, {"role": "assistant", "content": "The answer is"}]
    extra = {"echo": True, "add_generation_prompt": False, "continue_final_message": True, "ignore_eos": True}
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0,
                                           extra_body=extra)
    assert served.calls[-1][0]["prompt_token_ids"] == _templated(hf_tokenizer, messages, continue_final_message=True)
    content = reply.choices[0].message.content
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0,
                                           extra_body={**extra, "echo": False}).choices[0].message.content
    assert content == "The answer is" + plain
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=3, temperature=0, stream=True, extra_body=extra))
    assert streamed == content


# ---- /tokenize, /detokenize, /version, /v1/models ----------------------------------------------------------

def test_tokenize_a_prompt(served, hf_tokenizer):
    text = "Hello world, how are you?"
    reply = _post(served, "/tokenize", {"prompt": text, "return_token_strs": True})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["tokens"] == hf_tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == MAX_MODEL_LEN
    assert body["token_strs"] == hf_tokenizer.convert_ids_to_tokens(body["tokens"])
    plain = _post(served, "/tokenize", {"model": MODEL, "prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == hf_tokenizer.encode(text, add_special_tokens=False) and "token_strs" not in plain


def test_tokenize_messages_as_the_chat_endpoint_does(served, client, hf_tokenizer):
    body = _post(served, "/tokenize", {"messages": HELLO}).json()
    assert body["tokens"] == _templated(hf_tokenizer, HELLO, add_generation_prompt=True)
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert served.calls[-1][0]["prompt_token_ids"] == body["tokens"]
    closed = _post(served, "/tokenize", {"messages": HELLO, "add_generation_prompt": False,
                                         "chat_template_kwargs": {"enable_thinking": True}}).json()
    assert closed["tokens"] == _templated(hf_tokenizer, HELLO, add_generation_prompt=False)
    thinking = _post(served, "/tokenize", {"messages": HELLO, "chat_template_kwargs": {"enable_thinking": True}})
    assert thinking.json()["tokens"] == _templated(hf_tokenizer, HELLO, add_generation_prompt=True,
                                                   enable_thinking=True)


def test_detokenize(served, hf_tokenizer):
    ids = hf_tokenizer.encode("Round trip, ünïcödé included.")
    reply = _post(served, "/detokenize", {"tokens": ids})
    assert reply.status_code == 200 and reply.json() == {"prompt": hf_tokenizer.decode(ids)}
    assert _post(served, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize("path,body,status,param", [
    ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens"), ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens"), ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model"), ("/detokenize", {"model": "o", "tokens": [1]}, 404,
                                                                      "model"),
    ("/tokenize", {"messages": []}, 400, "messages"), ("/tokenize", {}, 400, "prompt"),
])
def test_tokenize_errors(served, path, body, status, param):
    reply = _post(served, path, body)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param


def test_new_routes_need_the_key(served):
    for method, path in [("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/version")]:
        assert httpx.request(method, served.url + path, json={"prompt": "x", "tokens": [1]}).status_code == 401
        assert httpx.request(method, served.url + path, headers=AUTH, json={"prompt": "x", "tokens": [1]}
                             ).status_code == 200


def test_version_is_the_package_version(served):
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    reply = httpx.get(served.url + "/version", headers=AUTH, timeout=30)
    assert reply.json() == {"version": pyproject["project"]["version"]}


def test_models_carry_max_model_len(client):
    (card,) = client.models.list().data
    assert card.id == MODEL and card.max_model_len == MAX_MODEL_LEN
    assert card.root == MODEL and card.parent is None
    assert card.permission[0]["object"] == "model_permission" and card.permission[0]["allow_sampling"] is True

