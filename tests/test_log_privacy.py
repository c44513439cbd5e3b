"""What the server logs: by default one line per request and no prompt, completion or key text anywhere (the
server's logger, uvicorn's, exception tracebacks); with ``--log-requests`` the texts, masked."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import time

import httpx
import pytest

from server_helpers import ServerProcess

OWN_KEY = "sk-privacy-own-key-5d2f9c1a"
OTHER_KEY = "sk-privacy-other-key-8e7b"
KEYS = {"alice": OWN_KEY, "ops": OTHER_KEY}

# raw string -> the mask it must turn into
SENSITIVE = {
    "jane.doe+billing@example.co.uk": "[EMAIL]",
    "j_smith@mail.example.org": "[EMAIL]",
    "+1 (415) 555-0134": "[PHONE]",
    "415-555-0198": "[PHONE]",
    "+44 20 7946 0958": "[PHONE]",
    "4111 1111 1111 1111": "[CARD]",
    "5500-0000-0000-0004": "[CARD]",
    "378282246310005": "[CARD]",
    "sk-proj-Zx81QwErTy55uIoPaSdF": "[SECRET]",
    "Bearer abc123DEF456ghi789JKL0": "Bearer [SECRET]",
    "AKIAIOSFODNN7EXAMPLE": "[SECRET]",
    "ghp_16C7e42F292c6912E7710c838347Ae178B4a": "[SECRET]",
    "3f786850e387550fdab836ed7e6dc881de23001b": "[SECRET]",
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY": "[SECRET]",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N": "[SECRET]",
    OWN_KEY: "[API-KEY]",
}
BENIGN = ["The meeting is on 2024-01-15 at 10:30.", "Count: 1, 2, 3, 4, 5, 6, 7, 8.", "Python 3.11.7 is out.",
          "basic training", "the bearer of good news", "pi is 3.14159265358979", "order #12345 costs $1,234.56",
          "supercalifragilisticexpialidocious", "version 1.2.3-rc4", "It was 1999."]


def _raw_parts(raw: str) -> list[str]:
    """The raw value and its distinctive pieces, none of which may survive masking."""
    return [raw] + [p for p in re.split(r"[\s()+-]", raw) if len(p) >= 6 and p not in ("Bearer",)]


# ---- the masking module ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", list(SENSITIVE))
def test_masks(raw):
    from dist_infer.entrypoints.openai.redact import Redactor

    masked = Redactor([OWN_KEY])(f"before {raw} after")
    assert masked == f"before {SENSITIVE[raw]} after", masked
    for part in _raw_parts(raw):
        assert part not in masked, part


def test_benign_text_is_left_alone():
    from dist_infer.entrypoints.openai.redact import Redactor

    for text in BENIGN:
        assert Redactor([OWN_KEY])(text) == text


def test_masks_in_running_text():
    from dist_infer.entrypoints.openai.redact import Redactor

    text = ("Contact me at jane.doe+billing@example.co.uk or +1 (415) 555-0134; card 4111 1111 1111 1111, "
            f"key {OWN_KEY}, and the header Authorization: Bearer abc123DEF456ghi789JKL0.\n"
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\npassword=hunter2hunter")
    masked = Redactor([OWN_KEY])(text)
    assert masked == ("Contact me at [EMAIL] or [PHONE]; card [CARD], key [API-KEY], and the header "
                      "Authorization: Bearer [SECRET].\n[SECRET]\npassword=[SECRET]"), masked


def test_exception_messages_are_hidden_unless_asked():
    from dist_infer.entrypoints.openai.redact import Redactor
    from dist_infer.entrypoints.openai.request_log import format_exception

    # the messages are built apart from the raising lines: a traceback shows their source
    inner_message = "prompt text: my e-mail is " + list(SENSITIVE)[0]
    outer_message = "Input should be a valid integer, got 'secret " + "sk-proj-Zx81QwErTy55uIoPaSdF'"
    try:
        try:
            raise KeyError(inner_message)
        except KeyError as inner:
            raise ValueError(outer_message) from inner
    except ValueError as e:
        hidden, masked = format_exception(e), format_exception(e, Redactor())
    assert "Traceback" in hidden and "ValueError: <message hidden" in hidden and "KeyError: <message hidden" in hidden
    assert "test_log_privacy.py" in hidden  # the frames stay: they say where it failed
    assert "jane.doe" not in hidden and "Zx81QwErTy55" not in hidden and "valid integer" not in hidden
    assert "[EMAIL]" in masked and "[SECRET]" in masked and "Zx81QwErTy55" not in masked and "valid integer" in masked


def test_the_log_filter_cleans_any_librarys_records():
    from dist_infer.entrypoints.openai.redact import Redactor
    from dist_infer.entrypoints.openai.request_log import PrivacyFilter

    message = "failed for the body {'prompt': '" + list(SENSITIVE)[0] + "'} " + OWN_KEY
    try:
        raise RuntimeError(message)
    except RuntimeError as e:
        record = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application %s",
                                   (f"key={OWN_KEY}",), (type(e), e, e.__traceback__))
    assert PrivacyFilter(Redactor([OWN_KEY]), log_requests=False).filter(record)
    text = logging.Formatter().format(record)
    assert "Exception in ASGI application key=[API-KEY]" in text and "RuntimeError: <message hidden" in text
    assert OWN_KEY not in text and "jane.doe" not in text


# ---- in process: an exception inside a request --------------------------------------------------------------------

class _FailingEngine:
    tokenizer = None

    def __init__(self, message: str):
        self.message = message

    def num_waiting(self) -> int:
        return 0

    def check_prompt(self, prompt, params):
        raise RuntimeError(self.message)  # a fault that quotes the request


@pytest.mark.parametrize("log_requests", [False, True])
def test_a_failing_request_logs_no_text(caplog, log_requests):
    from dist_infer.entrypoints.openai.api_server import ServerSettings, build_app

    secret_prompt = f"my card is 4111 1111 1111 1111 and the marker {secrets.token_hex(8)}"
    app = build_app(_FailingEngine(f"cannot handle {secret_prompt!r}"),
                    ServerSettings("m", OWN_KEY, log_requests=log_requests))

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/v1/completions", json={"model": "m", "prompt": secret_prompt},
                                     headers={"Authorization": f"Bearer {OWN_KEY}", "x-request-id": "req-7"})

    with caplog.at_level(logging.DEBUG, logger="dist_infer"):
        response = asyncio.run(run())
    assert response.status_code == 500 and "req-7" in response.json()["error"]["message"]
    assert "request req-7 to /v1/completions failed" in caplog.text and "RuntimeError" in caplog.text
    assert "4111" not in caplog.text and OWN_KEY not in caplog.text
    assert (secret_prompt.split()[-1] in caplog.text) == log_requests  # the message: hidden, or logged masked
    assert ("[CARD]" in caplog.text) == log_requests
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request id=req-7")]
    assert len(line) == 1 and "status=500" in line[0] and "key=default" in line[0], line


# ---- real servers ---------------------------------------------------------------------------------------------

def _key_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("privacy") / "keys"
    path.write_text("".join(f"{n}: {k}\n" for n, k in KEYS.items()))
    path.chmod(0o600)
    return str(path)


def _start(model_path: str, key_file: str, *flags: str) -> ServerProcess:
    return ServerProcess("--model", model_path, "--kv-cache-memory", str(1 << 22), "--api-key-file", key_file,
                         "--log-level", "debug", *flags)


def _traffic(server, model: str, text: str) -> dict:
    """Completions and chats (streamed and not) carrying ``text``, a validation error and a JSON error echoing
    it, a key in a query string, a wrong key and an unknown path. Returns the texts the server generated."""
    auth = {"Authorization": f"Bearer {OWN_KEY}"}
    url = server.base_url
    out = {}
    with httpx.Client(timeout=120) as client:
        reply = client.post(f"{url}/v1/completions", headers={**auth, "x-request-id": "cmpl-plain"},
                            json={"model": model, "prompt": text, "max_tokens": 12, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        out["completion"] = reply.json()["choices"][0]["text"]
        chat = client.post(f"{url}/v1/chat/completions", headers={**auth, "x-request-id": "chat-plain"},
                           json={"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 12,
                                 "ignore_eos": True})
        assert chat.status_code == 200, chat.text
        out["chat"] = chat.json()["choices"][0]["message"]["content"]
        body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, "stream": True}
        with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                           headers={**auth, "x-request-id": "chat-stream"}) as stream:
            assert stream.status_code == 200
            assert [line for line in stream.iter_lines() if line][-1] == "data: [DONE]"
        invalid = client.post(f"{url}/v1/completions", headers={**auth, "x-request-id": "invalid"},
                              json={"model": model, "prompt": text, "max_tokens": text})
        assert invalid.status_code == 400
        broken = client.post(f"{url}/v1/completions", headers={**auth, "x-request-id": "broken",
                                                             "Content-Type": "application/json"},
                             content=("{" + text).encode())
        assert broken.status_code == 400
        query = client.get(f"{url}/v1/models?api_key={OWN_KEY}&q={text[:40]}",
                           headers={**auth, "x-request-id": "query"})
        assert query.status_code == 200
        wrong = client.get(f"{url}/v1/models",
                           headers={"Authorization": f"Bearer {OTHER_KEY}x", "x-request-id": "wrong"})
        assert wrong.status_code == 401
        assert client.get(f"{url}/v1/{OTHER_KEY}", headers={**auth, "x-request-id": "unknown"}).status_code == 404
    return out


TRAFFIC_IDS = ["cmpl-plain", "chat-plain", "chat-stream", "invalid", "broken", "query", "wrong", "unknown"]


def _wait_for_lines(server, ids: list[str], timeout: float = 30.0) -> str:
    """The log, once it holds the request line of each id (a line is written just after its answer)."""
    deadline = time.monotonic() + timeout
    while True:
        log = server.output()
        if all(f"request id={i} " in log for i in ids) or time.monotonic() > deadline:
            return log
        time.sleep(0.2)


def _request_line(log: str, request_id: str) -> str:
    lines = [line for line in log.splitlines() if f"request id={request_id} " in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def model(tiny_llama_with_tokenizer) -> str:
    return os.path.basename(tiny_llama_with_tokenizer)


@pytest.fixture(scope="module")
def quiet_log(tiny_llama_with_tokenizer, tmp_path_factory, model):
    """A server at --log-level debug without --log-requests, after the traffic: (its log, a marker, outputs)."""
    server = _start(tiny_llama_with_tokenizer, _key_file(tmp_path_factory))
    marker = f"zebracorn{secrets.token_hex(6)}"
    try:
        outputs = _traffic(server, model, f"{marker} says: " + " | ".join(SENSITIVE))
        log = _wait_for_lines(server, TRAFFIC_IDS)
    finally:
        server.stop()
    return log, marker, outputs


def test_no_text_reaches_the_log_by_default(quiet_log):
    log, marker, outputs = quiet_log
    assert marker not in log
    for raw in SENSITIVE:
        for part in _raw_parts(raw):
            assert part not in log, part
    for key in KEYS.values():
        assert key not in log
    for name, text in outputs.items():
        if len(text.strip()) >= 12:  # long enough not to occur in a log by chance
            assert text not in log and json.dumps(text)[1:-1] not in log, name
    assert "prompt=" not in log and "completion=" not in log and "[EMAIL]" not in log


def test_each_request_gets_a_line_with_counts(quiet_log):
    log, _, _ = quiet_log
    line = _request_line(log, "cmpl-plain")
    for field in ("method=POST", "endpoint=/v1/completions", "status=200", "key=alice", "client=127.0.0.1",
                  "completion_tokens=12", "ttft_s=", "duration_s="):
        assert field in line, (field, line)
    assert int(re.search(r"prompt_tokens=(\d+)", line).group(1)) > 10
    stream = _request_line(log, "chat-stream")
    assert "endpoint=/v1/chat/completions" in stream and "completion_tokens=" in stream
    assert "endpoint=unmatched status=404 key=alice" in _request_line(log, "unknown")
    assert "endpoint=/v1/models status=401 key=unauthenticated" in _request_line(log, "wrong")
    assert "status=400 key=alice client=127.0.0.1 error=invalid_value:max_tokens " in _request_line(log, "invalid")
    assert "status=400 key=alice client=127.0.0.1 error=invalid_json " in _request_line(log, "broken")
    assert "error=invalid_api_key " in _request_line(log, "wrong")
    assert "dist_infer.server" in line and " INFO " in line
    assert not re.search(r'"GET /v1/models', log)  # uvicorn's access log (raw paths, query strings) is off


@pytest.fixture(scope="module")
def logged(tiny_llama_with_tokenizer, tmp_path_factory, model):
    server = _start(tiny_llama_with_tokenizer, _key_file(tmp_path_factory), "--log-requests")
    marker = f"zebracorn{secrets.token_hex(6)}"
    try:
        outputs = _traffic(server, model, f"{marker} says: " + " | ".join(SENSITIVE))
        _wait_for_lines(server, TRAFFIC_IDS)
    finally:
        server.stop()
    return server.output(), marker, outputs


def test_log_requests_logs_masked_text(logged):
    log, marker, outputs = logged
    line = _request_line(log, "cmpl-plain")
    assert marker in line and "prompt=" in line and "completion=" in line
    prompt = json.loads(re.search(r"prompt=(\[.*?\]) completion=", line).group(1))[0]
    assert prompt == f"{marker} says: " + " | ".join(SENSITIVE.values()), prompt
    chat = _request_line(log, "chat-stream")
    assert f"user: {marker} says: [EMAIL]" in chat
    for raw in SENSITIVE:
        for part in _raw_parts(raw):
            assert part not in log, part
    assert OTHER_KEY not in log


def test_log_requests_still_keeps_keys_and_query_strings_out(logged):
    log, _, _ = logged
    assert OWN_KEY not in log and OTHER_KEY not in log
    assert "api_key=" not in log  # the query string is not logged
