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


def test_chat(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0 and reply.usage.total_tokens == reply.usage.prompt_tokens + \
        reply.usage.completion_tokens


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
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=1.0, n=2, seed=3)
    assert [c.index for c in reply.choices] == [0, 1]
    again = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=1.0, n=2, seed=3)
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
    reply = client.completions.create(model=MODEL, prompt="Knock knock.", max_tokens=3, temperature=0, echo=True)
    assert reply.choices[0].text.startswith("Knock knock.")


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
