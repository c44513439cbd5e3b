"""Structured outputs (``SamplingParams.structured_outputs``, xgrammar): the grammar, not the model, makes the
output valid.

The model is a tiny random Llama that speaks SmolLM2's tokenizer: unconstrained, it emits garbage (checked), so
every valid output below is the mask's doing. Validity is judged by code nobody here wrote: ``jsonschema``,
``json``, Python's ``re`` and the official ``openai`` client's ``parse`` (pydantic). Strings in the schemas have
a ``maxLength`` and arrays a ``maxItems``, so every completion can finish within ``max_tokens``; they must
finish (``finish_reason == "stop"``), not be cut.
"""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

from dist_infer import LLM, SamplingParams, StructuredOutputsParams
from dist_infer.distributed.utils import get_open_port

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "country": {"enum": ["FR", "DE", "US"]}},
            "required": ["city", "country"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "friends": {
            "type": "array",
            "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                         "close": {"type": "boolean"}},
                      "required": ["name", "close"], "additionalProperties": False},
            "maxItems": 2,
        },
    },
    "required": ["name", "role", "active", "address", "tags", "friends"],
    "additionalProperties": False,
}
PROMPT = "Describe one user as JSON:"
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def llm(tiny_llama_with_tokenizer):
    llm = LLM(model=tiny_llama_with_tokenizer, max_model_len=512, kv_cache_memory=1 << 24)
    yield llm
    llm.engine.shutdown()


def _runner(llm):
    return llm.engine.executor._shared.worker.runner  # the uniproc worker, in this process


def _params(seed: int, **spec) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=MAX_TOKENS,
                          structured_outputs=StructuredOutputsParams(**spec))


def _texts(outputs) -> list[str]:
    return [o.outputs[0].text for o in outputs]


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _all_stopped(outputs) -> None:
    reasons = [o.outputs[0].finish_reason for o in outputs]
    assert reasons == ["stop"] * len(outputs), reasons


# ---- the spec ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields,named", [
    ({}, "exactly one"), ({"regex": "a+", "choice": ["a"]}, "exactly one"),
    ({"regex": "a(b"}, "structured_outputs.regex"), ({"json": "{not json"}, "structured_outputs.json"),
    ({"json": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}, "structured_outputs.json"),
    ({"grammar": "root ::= missing_rule"}, "structured_outputs.grammar"), ({"choice": []}, "structured_outputs.choice"),
])
def test_bad_specs_are_refused_naming_the_field(fields, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        StructuredOutputsParams(**fields)


def test_combinations_where_the_grammar_cannot_end_the_output_are_refused():
    spec = StructuredOutputsParams(json_object=True)
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured_outputs=spec)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs=spec)


# ---- LLM level ---------------------------------------------------------------------------------------------

def test_json_schema_always_validates_over_many_samples_at_temperature_1(llm):
    seeds = range(50)
    free = llm.generate([PROMPT] * 10, [SamplingParams(temperature=1.0, seed=s, max_tokens=40) for s in range(10)],
                        use_tqdm=False)
    assert not any(_is_json_object(text) for text in _texts(free))  # the model alone does not write JSON
    outputs = llm.generate([PROMPT] * len(seeds), [_params(s, json=SCHEMA) for s in seeds], use_tqdm=False)
    _all_stopped(outputs)
    docs = [json.loads(text) for text in _texts(outputs)]
    for doc in docs:
        jsonschema.validate(doc, SCHEMA)
    assert len({json.dumps(d) for d in docs}) > 10  # sampled, not one forced answer


def test_regex_choice_and_grammar(llm):
    regex = r"[a-z]{2,6}-[0-9]{2,4}(\.(com|org))?"
    choices = ["yes", "no", "maybe so", "ask again"]
    grammar = 'root ::= color ("," color)? ("," color)?\ncolor ::= "red" | "green" | "blue"'
    n = 12
    params = ([_params(s, regex=regex) for s in range(n)] + [_params(s, choice=choices) for s in range(n)]
              + [_params(s, grammar=grammar) for s in range(n)])
    outputs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    _all_stopped(outputs)
    texts = _texts(outputs)
    for text in texts[:n]:
        assert re.fullmatch(regex, text), text
    assert set(texts[n:2 * n]) <= set(choices) and len(set(texts[n:2 * n])) > 1, texts[n:2 * n]
    for text in texts[2 * n:]:
        assert re.fullmatch(r"(red|green|blue)(,(red|green|blue)){0,2}", text), text


def test_workers_in_other_processes_constrain_alike(llm, tiny_llama_with_tokenizer):
    """mp, tp=2 x pp=2: the sampling rank (last stage, tp rank 0) is another process that loads the tokenizer
    and compiles the grammars itself; its seeded, constrained outputs equal one process's."""
    params = [_params(s, json=SCHEMA) for s in range(4)] + [_params(s, choice=["yes", "no", "maybe so"])
                                                             for s in range(4)]
    alone = _texts(llm.generate([PROMPT] * len(params), params, use_tqdm=False))
    with LLM(model=tiny_llama_with_tokenizer, max_model_len=512, kv_cache_memory=1 << 24,
             distributed_executor_backend="mp", tensor_parallel_size=2, pipeline_parallel_size=2) as spread:
        outputs = spread.generate([PROMPT] * len(params), params, use_tqdm=False)
    _all_stopped(outputs)
    for text in _texts(outputs)[:4]:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert _texts(outputs) == alone


def test_json_object_parses(llm):
    tok = llm.get_tokenizer()
    # Any JSON object is unbounded (a random model would rarely close a string); a bias towards the closing
    # characters keeps it short enough to finish.
    closers = {t: 8.0 for text in ('"', "}", '"}') for t in tok.encode(text, add_special_tokens=False)}
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=MAX_TOKENS, logit_bias=closers,
                             structured_outputs=StructuredOutputsParams(json_object=True)) for s in range(10)]
    outputs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    _all_stopped(outputs)
    for text in _texts(outputs):
        assert isinstance(json.loads(text), dict), text


def test_unconstrained_requests_are_unchanged_in_a_mixed_batch(llm):
    free = [SamplingParams(temperature=1.0, seed=100 + s, max_tokens=24) for s in range(4)]
    alone = llm.generate([PROMPT] * 4, free, use_tqdm=False)
    mixed = llm.generate([PROMPT] * 8, [p for pair in zip(free, [_params(s, json=SCHEMA) for s in range(4)])
                                        for p in pair], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[0::2]] == [o.outputs[0].token_ids for o in alone]
    for text in _texts(mixed[1::2]):
        jsonschema.validate(json.loads(text), SCHEMA)


def test_the_mask_fill_starts_before_the_forward(llm):
    runner = _runner(llm)
    seen = []
    hook = runner.model.register_forward_pre_hook(lambda module, args: seen.append(runner.structured.fills_started))
    try:
        before = runner.structured.fills_started
        out = llm.generate([PROMPT], [_params(0, choice=["alpha beta gamma delta"])], use_tqdm=False)
    finally:
        hook.remove()
    steps = len(out[0].outputs[0].token_ids)
    # One forward per step (the prompt fits one step), each sampling the request: when the forward of step i
    # began, the fills of steps 1..i had been started.
    assert len(seen) >= steps and [s - before for s in seen] == list(range(1, len(seen) + 1)), (seen, steps)


def test_a_resent_request_replays_its_output_and_padding_ids_are_never_allowed(tiny_llama_with_tokenizer):
    from transformers import AutoTokenizer

    from dist_infer.structured_output.batch_mask import StructuredOutputs, unpack_bitmask
    from dist_infer.worker.request_state import CachedRequestState

    tok = AutoTokenizer.from_pretrained(tiny_llama_with_tokenizer)
    vocab = len(tok) + 64  # the model's vocabulary padded past the tokenizer's
    so = StructuredOutputs(lambda: (tok, {2}), vocab)
    schema = {"type": "object", "properties": {"role": {"enum": ["admin", "user", "guest"]}}, "required": ["role"],
              "additionalProperties": False}
    prompt = tok.encode(PROMPT)
    output = tok.encode('{"role":"', add_special_tokens=False)  # generated before a preemption or a migration
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))
    states = [CachedRequestState("resent", prompt + output, params, [], 0, len(prompt), (2,)),
              CachedRequestState("free", list(prompt), SamplingParams(), [], 0)]
    bitmask, rows = so.start(states).result("cpu")
    assert rows == [0]  # the other row is left alone
    mask = unpack_bitmask(bitmask, vocab)
    assert mask.shape == (2, vocab)
    assert not mask[0, len(tok):].any()
    allowed = [tok.decode([t]) for t in mask[0].nonzero().flatten().tolist()]
    assert {text[0] for text in allowed} == {"a", "u", "g"}, allowed
    for text in allowed:  # every allowed token continues the enum value, then closes the document
        assert any(word.startswith(text) for word in ('admin"}', 'user"}', 'guest"}')), text


def test_masking_adds_little_to_step_time_at_batch_32(default_model_path, monkeypatch):
    """The figure at batch 32 with the real SmolLM2-135M: what the mask adds to a decoding step (the part of the
    fill that running beside the forward did not hide, the bitmask's copy, and applying it to the logits,
    their copy included) against the step's time. Timed inside each step, so both figures share the machine's
    load of that moment."""
    from dist_infer.layers.sampler import Sampler

    applying = []
    real_apply = Sampler._apply_constraints

    def timed_apply(logits, batch):
        start = time.perf_counter()
        out = real_apply(logits, batch)
        applying.append(time.perf_counter() - start)
        return out

    monkeypatch.setattr(Sampler, "_apply_constraints", staticmethod(timed_apply))
    llm = LLM(model=default_model_path, max_model_len=256, kv_cache_memory=1 << 26)
    try:
        runner = _runner(llm)
        real, steps = runner.execute_model, []

        def timed(sched):
            start = time.perf_counter()
            out = real(sched)
            timing = runner.structured.last_timing
            if len(sched.num_scheduled_tokens) == 32 and sum(sched.num_scheduled_tokens.values()) == 32:
                added = timing["wait_s"] + timing["copy_s"] + applying[-1]
                steps.append((time.perf_counter() - start, added, timing["fill_s"]))
            return out

        runner.execute_model = timed
        params = [SamplingParams(temperature=1.0, seed=s, max_tokens=12, structured_outputs=StructuredOutputsParams(
            json=SCHEMA)) for s in range(32)]
        llm.generate(["Describe one user as JSON:"] * 32, params, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    assert len(steps) >= 5, steps
    step = statistics.median(s for s, _, _ in steps)
    added = statistics.median(a for _, a, _ in steps)
    fill = statistics.median(f for _, _, f in steps)
    print(f"batch 32: step {step * 1e3:.1f} ms, mask fill {fill * 1e3:.2f} ms (in the background), "
          f"added to the step {added * 1e3:.2f} ms")
    assert added < 0.25 * step, (added, step)


# ---- HTTP, with the official openai client -----------------------------------------------------------------

KEY = "sk-structured-test"


@pytest.fixture(scope="module")
def server(tiny_llama_with_tokenizer):
    import uvicorn

    from dist_infer import AsyncLLMEngine
    from dist_infer.entrypoints.openai.api_server import ServerSettings, build_app
    from dist_infer.entrypoints.openai.http_server import uvicorn_config

    engine = AsyncLLMEngine.from_engine_args(model=tiny_llama_with_tokenizer, kv_cache_memory=1 << 24,
                                             max_model_len=512)
    settings = ServerSettings("tiny", KEY)
    port = get_open_port()
    server = uvicorn.Server(uvicorn_config(build_app(engine, settings), "127.0.0.1", port, "warning", settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=30)
    engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0)


class Address(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=12)
    country: Literal["FR", "DE", "US"]


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    role: Literal["admin", "user", "guest"]
    address: Address
    tags: list[Literal["red", "green", "blue"]] = pydantic.Field(max_length=3)


MESSAGES = [{"role": "user", "content": "Describe one user."}]


def test_openai_parse_returns_a_valid_object(client):
    for seed in range(3):
        completion = client.chat.completions.parse(model="tiny", messages=MESSAGES, response_format=Person,
                                                   temperature=1.0, seed=seed, max_tokens=MAX_TOKENS)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Person), choice.message.content
        assert Person.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_schema_over_50_completions_at_temperature_1_always_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "user", "schema": SCHEMA, "strict": True}}
    contents = []
    for seed in range(5):
        completion = client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=fmt, n=10,
                                                    temperature=1.0, seed=seed, max_tokens=MAX_TOKENS)
        assert [c.finish_reason for c in completion.choices] == ["stop"] * 10
        contents += [c.message.content for c in completion.choices]
    assert len(contents) == 50
    for content in contents:
        jsonschema.validate(json.loads(content), SCHEMA)


def test_vllm_fields_on_completions(client):
    regex = r"[0-9]{3}-[a-z]{2,4}"
    for body in ({"guided_regex": regex}, {"structured_outputs": {"regex": regex}}):
        out = client.completions.create(model="tiny", prompt="Code:", temperature=1.0, max_tokens=32, n=4,
                                        extra_body=body)
        for c in out.choices:
            assert c.finish_reason == "stop" and re.fullmatch(regex, c.text), c.text
    out = client.completions.create(model="tiny", prompt="Pick:", max_tokens=32, n=4, temperature=1.0,
                                    extra_body={"guided_choice": ["left", "right"]})
    assert {c.text for c in out.choices} <= {"left", "right"}
    out = client.completions.create(model="tiny", prompt="JSON:", max_tokens=MAX_TOKENS, n=3, temperature=1.0,
                                    extra_body={"guided_json": SCHEMA})
    for c in out.choices:
        jsonschema.validate(json.loads(c.text), SCHEMA)


@pytest.mark.parametrize("body,param", [
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_grammar": "root ::= nothing_here"}, "guided_grammar"),
    ({"structured_outputs": {"json": "{oops"}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}}},
     "response_format"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
])
def test_invalid_specs_are_400_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, extra_body=body)
    error = info.value.body
    assert info.value.status_code == 400 and error["param"] == param, error
