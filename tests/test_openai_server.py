"""The official ``openai`` client, unmodified, against ``dist-infer serve`` on the embedded default model."""

from __future__ import annotations

import subprocess

import httpx
import openai
import pytest

from server_helpers import ServerProcess

KEY = "sk-test-key"
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server(default_model_path):
    server = ServerProcess("--api-key", KEY, "--max-model-len", "2048", "--kv-cache-memory", str(1 << 28))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY)


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


def _templated_length(tokenizer, messages) -> int:
    """The prompt's length by Hugging Face's own template and tokenizer, independent of the server's code."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_chat(client, tokenizer):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0,
                                           logprobs=True)
    content = reply.choices[0].message.content
    assert "Paris" in content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == _templated_length(tokenizer, QUESTION)
    tokens = reply.choices[0].logprobs.content  # the generated tokens, the end-of-turn token last
    assert "".join(t.token for t in tokens[:-1]) == content and tokens[-1].token == tokenizer.eos_token
    assert reply.usage.completion_tokens == len(tokens)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    cut = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3, temperature=0)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3
    assert content.startswith(cut.choices[0].message.content)


def test_chat_content_as_text_parts(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of France?"}]}]
    as_parts = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=20, temperature=0)
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    assert as_parts.choices[0].message.content == plain.choices[0].message.content
    assert as_parts.usage.prompt_tokens == plain.usage.prompt_tokens


def test_request_id_round_trip(server):
    given = httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": f"Bearer {KEY}",
                                                                 "x-request-id": "client-id-42"})
    assert given.headers["x-request-id"] == "client-id-42"
    fresh = [httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
             .headers["x-request-id"] for _ in range(2)]
    assert all(len(f) == 32 and int(f, 16) >= 0 for f in fresh) and fresh[0] != fresh[1]
    odd = httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": f"Bearer {KEY}",
                                                               "x-request-id": "bad id\twith spaces"})
    assert odd.headers["x-request-id"] != "bad id\twith spaces"  # not a plain token: replaced, never logged


def _stream_chat(client, **kwargs) -> tuple[list[str], str | None]:
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return pieces, finish


def test_multibyte_text_streams_whole(client):
    """Japanese from a byte-level tokenizer: characters span several tokens, so deltas must hold back partial
    bytes. The stream's deltas joined equal the non-streamed text, and no replacement character leaks."""
    ask = dict(messages=[{"role": "user", "content": "Say hello in Japanese."}], max_tokens=24, temperature=0)
    full = client.chat.completions.create(model=MODEL, **ask).choices[0].message.content
    assert any(ord(ch) > 0x3000 for ch in full), full  # the case this test is about
    pieces, _ = _stream_chat(client, **ask)
    assert "".join(pieces) == full and "\ufffd" not in "".join(pieces)


def test_stop_string_across_tokens_in_a_stream(client):
    """A stop string made of the end of one token and the start of the next: honoured, and not one character
    of it reaches the stream, though the first token's characters had to be held back to know."""
    ask = dict(messages=[{"role": "user", "content": "Translate into French: 'The summer was beautiful and the "
                                                     "coffee was delicious.'"}], max_tokens=40, temperature=0)
    full = client.chat.completions.create(model=MODEL, logprobs=True, **ask).choices[0]
    tokens = [t.token for t in full.logprobs.content]
    k = next(i for i in range(len(tokens) - 1) if len(tokens[i]) >= 2 and len(tokens[i + 1]) >= 2
             and tokens[i].isascii() and tokens[i + 1].isascii())
    stop = tokens[k][-2:] + tokens[k + 1][:2]
    expected = full.message.content[: full.message.content.index(stop)]
    pieces, finish = _stream_chat(client, stop=[stop], **ask)
    assert "".join(pieces) == expected and finish == "stop"
    whole = client.chat.completions.create(model=MODEL, stop=[stop], **ask).choices[0]
    assert whole.message.content == expected and whole.finish_reason == "stop"


def test_chat_stream_equals_non_stream(client):
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(parts) == full.choices[0].message.content
    assert finish == "stop" and usage.completion_tokens == full.usage.completion_tokens


def test_completion_and_stream(client):
    full = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
    assert text == full.choices[0].text and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 8


def test_n_two_with_seed(client):
    """Two choices of one seeded request differ (each has its own seed), and the same request gives the same two."""
    story = [{"role": "user", "content": "Write one sentence about a dragon."}]
    reply = client.chat.completions.create(model=MODEL, messages=story, max_tokens=16, temperature=1.5, n=2, seed=3)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content != reply.choices[1].message.content
    again = client.chat.completions.create(model=MODEL, messages=story, max_tokens=16, temperature=1.5, n=2, seed=3)
    assert [c.message.content for c in reply.choices] == [c.message.content for c in again.choices]
    completions = client.completions.create(model=MODEL, prompt=["One", "Two"], max_tokens=4, n=2, temperature=0)
    assert sorted(c.index for c in completions.choices) == [0, 1, 2, 3]


def test_stop_strings(client):
    full = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0).choices[0].text
    stop = full.strip().split(" ")[1]  # a word the model will produce
    cut = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_logprobs(client):
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.token == entry.top_logprobs[0].token  # greedy: the chosen token ranks first
    legacy = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == legacy.choices[0].text


def test_echo(client):
    plain = client.completions.create(model=MODEL, prompt="Knock knock.", max_tokens=3, temperature=0)
    reply = client.completions.create(model=MODEL, prompt="Knock knock.", max_tokens=3, temperature=0, echo=True)
    completion = plain.choices[0].text
    assert completion and reply.choices[0].text == "Knock knock." + completion


def test_wrong_and_missing_api_key(server):
    wrong = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-wrong")
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    response = httpx.get(f"{server.base_url}/v1/models")
    assert response.status_code == 401 and response.json()["error"]["message"] == "Missing API key"
    assert httpx.get(f"{server.base_url}/health").status_code == 200  # /health stays open


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    assert err.value.body["code"] == "model_not_found"


def test_readme_curl_example(server):
    """The README's curl command, with this server's port and key."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    command = re.search(r"```bash\n(curl [^`]+?)\n```", readme).group(1)
    command = command.replace("localhost:8000", f"127.0.0.1:{server.port}").replace("$DIST_INFER_API_KEY", KEY)
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_python_clients(server):
    import asyncio

    from dist_infer import AsyncClient, Client, ClientError

    with Client(server.base_url, api_key=KEY) as client:
        assert client.models() == [MODEL]
        reply = client.chat(QUESTION, max_tokens=20, temperature=0)
        text = reply["choices"][0]["message"]["content"]
        assert "Paris" in text
        assert "".join(client.stream_chat(QUESTION, max_tokens=20, temperature=0)) == text
        completion = client.complete("The capital of France is", max_tokens=6, temperature=0)["choices"][0]["text"]
        assert "".join(client.stream_complete("The capital of France is", max_tokens=6, temperature=0)) == completion
    with pytest.raises(ClientError) as err:
        Client(server.base_url, api_key="wrong").models()
    assert err.value.status == 401

    async def run():
        async with AsyncClient(server.base_url, api_key=KEY) as client:
            reply = await client.chat(QUESTION, max_tokens=20, temperature=0)
            pieces = [p async for p in client.stream_chat(QUESTION, max_tokens=20, temperature=0)]
            return reply["choices"][0]["message"]["content"], "".join(pieces)

    full, streamed = asyncio.run(run())
    assert full == streamed == text
