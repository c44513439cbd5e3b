"""Access control of ``dist-infer serve``: with API keys every route but /health needs one (unknown paths and
wrong methods too), several named keys from a file, key names (never keys) in metrics, bounded metric labels,
JSON-only POST bodies, 404/405 in OpenAI's shape, /metrics answering for a dead engine, and the checks and
warnings at start."""

from __future__ import annotations

import asyncio
import os
import random
import string
import subprocess
import sys

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_helpers import ServerProcess

CLI = [sys.executable, "-m", "dist_infer.entrypoints.cli"]
FILE_KEYS = {"alice": "sk-alice-4f6c1d0e9b8a7f65", "bob-ci": "sk-bob-0a1b2c3d4e5f6a7b8c9d"}
ENV_KEY = "sk-env-default-7c4e2a91d3b5"
ALL_KEYS = {"default": ENV_KEY, **FILE_KEYS}
OPEN_WITHOUT_KEY = {("GET", "/health"), ("HEAD", "/health")}


# ---- the routes, from the app itself ------------------------------------------------------------------------

class _NoEngine:
    """Enough of an engine for build_app; any engine call fails loudly."""

    tokenizer = None

    def __getattr__(self, name):
        raise AttributeError(f"the engine was called ({name})")


def _app(**settings):
    from dist_infer.entrypoints.openai.api_server import ServerSettings, build_app

    return build_app(_NoEngine(), ServerSettings("m", **settings))


def _app_routes() -> list[tuple[str, str]]:
    """(method, path) of every route the app has."""
    out = []
    for route in _app().routes:
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            out.append((method, route.path))
    return out


ROUTE_TEMPLATES = {path for _, path in _app_routes()}
PROBES = sorted(set(_app_routes()) | {
    ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/no/such/path"), ("GET", "/v1/no-such-route"),
    ("GET", "/health/"), ("GET", "/v1/models/"), ("OPTIONS", "/v1/chat/completions"),
    ("DELETE", "/v1/models"), ("GET", "/v1/completions"), ("POST", "/health"), ("PUT", "/metrics"),
})


def test_the_probe_list_covers_every_route():
    assert {"/health", "/ready", "/metrics", "/openapi.json", "/v1/models", "/v1/completions",
            "/v1/chat/completions", "/tokenize", "/detokenize", "/version"} <= ROUTE_TEMPLATES
    assert {p for _, p in PROBES} >= ROUTE_TEMPLATES


# ---- servers ------------------------------------------------------------------------------------------------

def _write_key_file(path) -> str:
    path.write_text("# keys of the access-control tests\n\n"
                    + "".join(f"{name}: {key}\n" for name, key in FILE_KEYS.items())
                    + "   # an indented comment\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> str:
    return _write_key_file(tmp_path_factory.mktemp("keys") / "api-keys")


@pytest.fixture(scope="module")
def server(tiny_llama_with_tokenizer, key_file):
    server = ServerProcess("--model", tiny_llama_with_tokenizer, "--kv-cache-memory", str(1 << 22),
                           "--api-key-file", key_file, env={"DIST_INFER_API_KEY": ENV_KEY})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model(tiny_llama_with_tokenizer) -> str:
    return os.path.basename(tiny_llama_with_tokenizer)


def _auth(name: str = "alice") -> dict:
    return {"Authorization": f"Bearer {ALL_KEYS[name]}"}


def _request(server, method: str, path: str, headers: dict | None = None, **kwargs) -> httpx.Response:
    return httpx.request(method, server.base_url + path, headers=headers, timeout=120, **kwargs)


def _samples(server, headers=None) -> list:
    response = httpx.get(server.base_url + "/metrics", headers=headers or _auth(), timeout=60)
    assert response.status_code == 200, response.text
    return [s for family in text_string_to_metric_families(response.text) for s in family.samples]


def _total(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


# ---- every route needs a key --------------------------------------------------------------------------------

@pytest.mark.parametrize("method,path", PROBES, ids=[f"{m} {p}" for m, p in PROBES])
def test_every_route_needs_a_key(server, method, path):
    if (method, path) in OPEN_WITHOUT_KEY:
        assert _request(server, method, path).status_code == 200
        assert _request(server, method, path, {"Authorization": "Bearer sk-wrong"}).status_code == 200
        return
    missing = _request(server, method, path)
    assert missing.status_code == 401, (missing.status_code, missing.text[:200])
    assert missing.headers["www-authenticate"] == "Bearer" and missing.headers["x-request-id"]
    if method != "HEAD":
        assert _assert_openai_error(missing, 401, "invalid_api_key")["message"] == "Missing API key"
    wrong = _request(server, method, path, {"Authorization": "Bearer sk-wrong-key"})
    assert wrong.status_code == 401
    if method != "HEAD":
        assert wrong.json()["error"]["message"] == "Incorrect API key provided"
    # a right key in the wrong scheme, or split across the header, is no key
    for header in (f"Basic {ENV_KEY}", ENV_KEY, f"Bearer {ENV_KEY[:-1]}", f"Bearer {ENV_KEY}x"):
        assert _request(server, method, path, {"Authorization": header}).status_code == 401, header


def test_each_key_works_and_metrics_carry_its_name_only(server, model):
    for name in ALL_KEYS:
        assert _request(server, "GET", "/v1/models", _auth(name)).status_code == 200, name
        reply = _request(server, "POST", "/v1/completions", _auth(name),
                         json={"model": model, "prompt": "Hello", "max_tokens": 3})
        assert reply.status_code == 200, reply.text
    response = httpx.get(server.base_url + "/metrics", headers=_auth("bob-ci"), timeout=60)
    samples = [s for f in text_string_to_metric_families(response.text) for s in f.samples]
    for name in ALL_KEYS:
        assert _total(samples, "dist_infer_requests_total", endpoint="/v1/models", status="200", key=name) >= 1, name
        assert _total(samples, "dist_infer_requests_total", endpoint="/v1/completions", status="200", key=name) >= 1
    keys_seen = {s.labels["key"] for s in samples if s.name == "dist_infer_requests_total"}
    assert keys_seen <= set(ALL_KEYS) | {"unauthenticated"}, keys_seen
    for key in ALL_KEYS.values():
        assert key not in response.text
    assert "sk-" not in response.text


def test_openai_client_with_a_wrong_and_a_right_key(server, model):
    wrong = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.completions.create(model=model, prompt="Hi", max_tokens=2)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    right = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=FILE_KEYS["bob-ci"], max_retries=0)
    assert right.completions.create(model=model, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.NotFoundError):  # an unknown route, in OpenAI's shape, through the client
        right.get("/no-such-thing", cast_to=object)


def test_ready_without_a_key_runs_no_check(server):
    before = _samples(server)
    for _ in range(5):
        assert _request(server, "GET", "/ready").status_code == 401
        assert _request(server, "GET", "/ready", {"Authorization": "Bearer sk-wrong"}).status_code == 401
    middle = _samples(server)
    for name in ("dist_infer_replica_requests_total", "dist_infer_ready_checks_total"):
        assert _total(middle, name) == _total(before, name), name  # no canary went through the engine
    assert _request(server, "GET", "/ready", _auth()).status_code == 200
    after = _samples(server)
    assert _total(after, "dist_infer_ready_checks_total", result="ok") == \
        _total(middle, "dist_infer_ready_checks_total", result="ok") + 1
    assert _total(after, "dist_infer_replica_requests_total") > _total(middle, "dist_infer_replica_requests_total")


def test_live_engine_metrics(server):
    samples = _samples(server)
    up = [s for s in samples if s.name == "dist_infer_replica_up"]
    assert [(s.labels["replica"], s.value) for s in up] == [("0", 1.0)]
    uptime = [s for s in samples if s.name == "dist_infer_worker_uptime_seconds"]
    assert uptime and all(set(s.labels) == {"model", "replica", "stage", "rank"} and s.value > 0 for s in uptime)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None, "application/jsonx", "text/json"])
def test_post_bodies_must_be_json(server, model, content_type):
    body = f'{{"model": "{model}", "prompt": "Hi", "max_tokens": 2}}'.encode()
    headers = {**_auth(), **({"Content-Type": content_type} if content_type else {})}
    response = httpx.post(server.base_url + "/v1/completions", content=body, headers=headers, timeout=60)
    _assert_openai_error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON;charset=UTF-8"])
def test_json_content_types_are_accepted(server, model, content_type):
    body = f'{{"model": "{model}", "prompt": "Hi", "max_tokens": 2}}'.encode()
    response = httpx.post(server.base_url + "/v1/completions", content=body, timeout=60,
                          headers={**_auth(), "Content-Type": content_type})
    assert response.status_code == 200, response.text


def test_random_paths_keep_metric_labels_bounded(server):
    rng = random.Random(10)
    alphabet = string.ascii_letters + string.digits + "-_~%"  # no '.': a client may fold "/x/.." into a route
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        for i in range(1000):
            segments = ("".join(rng.choices(alphabet, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 4)))
            path = "/" + "/".join(segments)
            path = rng.choice(["", "/v1", "/v1/models", "/metrics"]) + path
            method = rng.choice(["GET", "POST", "DELETE"])
            response = client.request(method, path, headers=_auth() if i % 2 else None)
            # without a key every path is 401 (routes cannot be probed); with one, no route has these paths
            assert response.status_code == (404 if i % 2 else 401), (method, path, response.status_code)
    samples = [s for s in _samples(server) if s.name == "dist_infer_requests_total"]
    endpoints = {s.labels["endpoint"] for s in samples}
    assert endpoints <= ROUTE_TEMPLATES | {"unmatched"}, endpoints - ROUTE_TEMPLATES
    assert _total(samples, "dist_infer_requests_total", endpoint="unmatched") >= 1000
    # each series is a (route template or "unmatched") x status x key name: a few dozen, not a thousand
    assert len(samples) <= (len(ROUTE_TEMPLATES) + 1) * 5 * (len(ALL_KEYS) + 1), len(samples)


def test_unknown_routes_and_wrong_methods_answer_in_openai_shape(server):
    error = _assert_openai_error(_request(server, "GET", "/v1/engines", _auth()), 404, "not_found")
    assert "/v1/engines" in error["message"]
    for method, path in (("DELETE", "/v1/models"), ("POST", "/v1/models"), ("GET", "/v1/chat/completions")):
        response = _request(server, method, path, _auth())
        _assert_openai_error(response, 405, "method_not_allowed")
        assert response.headers["allow"]


def test_client_reports_the_servers_message(server):
    from dist_infer import AsyncClient, Client, ClientError

    with pytest.raises(ClientError) as err:
        Client(server.base_url + "/api", api_key=ALL_KEYS["alice"]).models()
    assert err.value.status == 404 and "Invalid URL (GET /api/v1/models)" in str(err.value), str(err.value)
    assert "None" not in str(err.value)
    with pytest.raises(ClientError) as err:
        Client(server.base_url).models()
    assert err.value.status == 401 and str(err.value) == "HTTP 401: Missing API key"

    async def run():
        async with AsyncClient(server.base_url + "/api", api_key=ALL_KEYS["alice"]) as client:
            await client.models()

    with pytest.raises(ClientError) as err:
        asyncio.run(run())
    assert "Invalid URL" in str(err.value)


def test_client_error_messages_from_other_shapes():
    from dist_infer.entrypoints.client import ClientError

    assert str(ClientError(404, {"error": {"message": "Invalid URL (GET /x)"}})) == "HTTP 404: Invalid URL (GET /x)"
    assert str(ClientError(404, {"detail": "Not Found"})) == "HTTP 404: Not Found"  # a FastAPI app or proxy
    assert str(ClientError(502, "<html>Bad Gateway</html>")) == "HTTP 502: <html>Bad Gateway</html>"
    assert str(ClientError(500, {"error": "boom"})) == "HTTP 500: boom"
    assert "None" not in str(ClientError(500, {})) and "None" not in str(ClientError(502, ""))


def test_request_ids(server):
    mine = _request(server, "GET", "/v1/models", {**_auth(), "x-request-id": "trace-42.a:b"})
    assert mine.headers["x-request-id"] == "trace-42.a:b"
    odd = _request(server, "GET", "/v1/models", {**_auth(), "x-request-id": "not a plain token!"})
    assert odd.headers["x-request-id"] != "not a plain token!" and len(odd.headers["x-request-id"]) == 32
    assert _request(server, "GET", "/nope").headers["x-request-id"]  # rejected requests carry one too


# ---- --metrics-public -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def public_metrics_server(tiny_llama_with_tokenizer):
    server = ServerProcess("--model", tiny_llama_with_tokenizer, "--kv-cache-memory", str(1 << 22),
                           "--metrics-public", env={"DIST_INFER_API_KEY": ENV_KEY})
    yield server
    server.stop()


def test_metrics_public_opens_only_metrics(public_metrics_server):
    server = public_metrics_server
    response = httpx.get(server.base_url + "/metrics", timeout=60)
    assert response.status_code == 200
    assert any(f.name == "dist_infer_replica_up" for f in text_string_to_metric_families(response.text))
    for method, path in PROBES:
        if path == "/metrics" and method in ("GET", "HEAD") or (method, path) in OPEN_WITHOUT_KEY:
            continue
        assert _request(server, method, path).status_code == 401, (method, path)
    assert _request(server, "GET", "/v1/models", {"Authorization": f"Bearer {ENV_KEY}"}).status_code == 200


# ---- in process: a keyless server, a dead engine ------------------------------------------------------------------

def _asgi(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_keyless_server_refuses_non_json_posts_before_the_engine():
    async def run():
        async with _asgi(_app()) as client:
            plain = await client.post("/v1/completions", content=b'{"model": "m", "prompt": "x"}',
                                      headers={"Content-Type": "text/plain"})
            _assert_openai_error(plain, 415, "unsupported_media_type")
            form = await client.post("/v1/chat/completions", data={"model": "m"})
            _assert_openai_error(form, 415)
            _assert_openai_error(await client.get("/nowhere"), 404, "not_found")  # no key: 404, not 401
            _assert_openai_error(await client.post("/health", json={}), 405, "method_not_allowed")
            metrics = (await client.get("/metrics")).text
            return [s for f in text_string_to_metric_families(metrics) for s in f.samples]

    samples = asyncio.run(run())
    keys = {s.labels["key"] for s in samples if s.name == "dist_infer_requests_total"}
    assert keys == {"none"}


def test_metrics_answer_200_for_a_dead_engine(tiny_llama_with_tokenizer):
    from dist_infer.engine.async_llm_engine import AsyncLLMEngine
    from dist_infer.entrypoints.openai.api_server import ServerSettings, build_app

    engine = AsyncLLMEngine.from_engine_args(model=tiny_llama_with_tokenizer, kv_cache_memory=1 << 22)
    app = build_app(engine, ServerSettings("tiny", ENV_KEY), num_replicas=2)
    auth = {"Authorization": f"Bearer {ENV_KEY}"}

    async def scrape(client):
        response = await client.get("/metrics", headers=auth)
        assert response.status_code == 200, response.text
        return [s for f in text_string_to_metric_families(response.text) for s in f.samples]

    async def run():
        async with _asgi(app) as client:
            alive = await scrape(client)
            engine.shutdown()
            dead = await scrape(client)
            ready = await client.get("/ready", headers=auth)
            return alive, dead, ready, await scrape(client)

    try:
        alive, dead, ready, later = asyncio.run(run())
    finally:
        if engine.is_running:
            engine.shutdown()
    up = lambda samples: {s.labels["replica"]: s.value for s in samples if s.name == "dist_infer_replica_up"}
    assert up(alive)["0"] == 1.0
    assert up(dead) == {"0": 0.0, "1": 0.0}
    assert _total(dead, "dist_infer_requests_total", endpoint="/metrics", status="200", key="default") == 1
    assert not [s for s in dead if s.name == "dist_infer_kv_cache_usage_ratio"]  # no stale engine values
    assert ready.status_code == 503
    assert _total(later, "dist_infer_ready_checks_total", result="fail") == 1


# ---- keys -----------------------------------------------------------------------------------------------------

def test_identify_compares_every_key(monkeypatch):
    import hmac

    from dist_infer.entrypoints.openai import auth

    keys = auth.APIKeys({"a": "sk-aaaaaaaa", "b": "sk-bbbbbbbb", "c": "sk-cccccccc"})
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda x, y: calls.append(1) or real(x, y))
    assert keys.identify("Bearer sk-aaaaaaaa") == "a" and len(calls) == 3  # no short cut after the first match
    assert keys.identify("bearer  sk-cccccccc ") == "c"
    assert keys.identify("Bearer sk-dddddddd") is None and keys.identify(None) is None
    assert keys.identify("sk-aaaaaaaa") is None and keys.identify("Bearer ") is None
    assert "sk-" not in repr(keys)


@pytest.mark.parametrize("lines,line,message", [
    (["alice: sk-1111111111", "just-a-key-without-a-name"], 2, "expected 'name: key'"),
    (["alice: sk-1111111111", "", "# c", "alice: sk-2222222222"], 4, "'alice' is already used"),
    (["alice: sk-1111111111", "bob: sk-1111111111"], 2, "the key of 'bob' is the same as the key of 'alice'"),
    (["alice:", "bob: sk-2"], 1, "the key of 'alice' is empty"),
    (["alice:    "], 1, "is empty"),
    (["bad name: sk-1111111111"], 1, "must be 1-64 letters"),
    (["none: sk-1111111111"], 1, "is reserved"),
    ([": sk-1111111111"], 1, "expected 'name: key'"),
])
def test_bad_key_files_are_refused_naming_the_line(tmp_path, lines, line, message):
    from dist_infer.entrypoints.openai.auth import APIKeys

    path = tmp_path / "keys"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        APIKeys.load(key_file=str(path))
    assert f"{path}:{line}: " in str(err.value) and message in str(err.value), str(err.value)
    assert "sk-1111111111" not in str(err.value)  # an error never prints a key


def test_key_file_edge_cases(tmp_path):
    from dist_infer.entrypoints.openai.auth import APIKeys

    empty = tmp_path / "empty"
    empty.write_text("# nothing but a comment\n\n")
    with pytest.raises(ValueError, match="holds no keys"):
        APIKeys.load(key_file=str(empty))
    with pytest.raises(ValueError, match="cannot read the API key file"):
        APIKeys.load(key_file=str(tmp_path / "missing"))
    good = tmp_path / "good"
    good.write_text("alice: sk-with:colons:inside\nbob:sk-no-space\n")
    keys = APIKeys.load("sk-single-key", "DIST_INFER_API_KEY", str(good))
    assert keys.names == ["default", "alice", "bob"]
    assert keys.identify("Bearer sk-with:colons:inside") == "alice"
    clash = tmp_path / "clash"
    clash.write_text("default: sk-other-key\n")
    with pytest.raises(ValueError, match=f"{clash}:1: the name 'default' is already used"):
        APIKeys.load("sk-single-key", "DIST_INFER_API_KEY", str(clash))


# ---- start-up checks and warnings ---------------------------------------------------------------------------

@pytest.fixture
def serve(monkeypatch, capsys):
    """``dist-infer serve ARGS`` in process, stopped where it would load the model: (exit code, stderr, settings)."""
    import logging

    from dist_infer.entrypoints import cli
    from dist_infer.entrypoints.openai import api_server

    started = {}
    monkeypatch.setattr(api_server, "run_server", lambda engine_args, settings, host, *rest: started.update(
        settings=settings, host=host))
    root_level = logging.getLogger().level

    def run(*args: str, env_key: str | None = None):
        if env_key is None:
            monkeypatch.delenv("DIST_INFER_API_KEY", raising=False)
        else:
            monkeypatch.setenv("DIST_INFER_API_KEY", env_key)
        started.clear()
        code = cli.main(["serve", *args])
        logging.getLogger().setLevel(root_level)
        return code, capsys.readouterr().err, started.get("settings")

    return run


def test_empty_key_is_refused_at_start():
    """A real process: DIST_INFER_API_KEY="" would refuse every request, so the server does not start."""
    done = subprocess.run([*CLI, "serve", "--port", "1", "--model", "/nonexistent/model"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "DIST_INFER_API_KEY": ""})
    assert done.returncode == 1
    assert "DIST_INFER_API_KEY is set but empty" in done.stderr, done.stderr


def test_empty_or_unusable_keys_are_refused(serve, tmp_path):
    code, err, settings = serve("--api-key", "")
    assert code == 1 and "--api-key is set but empty" in err and settings is None
    code, err, _ = serve("--api-key", " sk-padded ")
    assert code == 1 and "without leading or trailing whitespace" in err
    bad = tmp_path / "keys"
    bad.write_text("alice: sk-1111111111\nalice: sk-2222222222\n")
    code, err, _ = serve("--api-key-file", str(bad))
    assert code == 1 and f"{bad}:2: the name 'alice' is already used" in err, err


def test_keyless_on_a_public_address_warns():
    """A real process: the warning is on stderr before the model loads (here it fails to)."""
    done = subprocess.run([*CLI, "serve", "--host", "0.0.0.0", "--port", "1", "--model", "/nonexistent/model"],
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "DIST_INFER_API_KEY"})
    assert "warning: serving on 0.0.0.0 without an API key" in done.stderr, done.stderr


def test_start_up_warnings(serve, tmp_path):
    for host in ("0.0.0.0", "::", "10.1.2.3", "my-host.example"):
        code, err, settings = serve("--host", host)
        assert code == 0 and f"serving on {host} without an API key" in err, (host, err)
        assert not settings.api_keys.enabled
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert serve("--host", host)[1] == "", host
    code, err, settings = serve("--host", "0.0.0.0", env_key="sk-from-the-environment")
    assert code == 0 and err == "" and settings.api_keys.names == ["default"]
    code, err, settings = serve("--api-key", "sk-on-the-command-line", env_key="sk-from-the-environment")
    assert "visible to other users" in err and "DIST_INFER_API_KEY" in err and "--api-key-file" in err
    assert "sk-on-the-command-line" not in err
    assert settings.api_keys.identify("Bearer sk-on-the-command-line") == "default"  # the flag wins
    assert settings.api_keys.identify("Bearer sk-from-the-environment") is None
    loose = tmp_path / "loose-keys"
    loose.write_text("alice: sk-1111111111\n")
    loose.chmod(0o644)
    code, err, settings = serve("--api-key-file", str(loose), "--metrics-public", "--log-requests")
    assert code == 0 and "can be read by other users" in err and settings.api_keys.names == ["alice"]
    assert settings.metrics_public and settings.log_requests


def test_server_options_from_a_cluster_config(serve, tmp_path, key_file):
    config = tmp_path / "server.yaml"
    config.write_text(f"server:\n  api_key_file: {key_file}\n  metrics_public: true\n  log_requests: false\n")
    code, err, settings = serve("--config", str(config))
    assert code == 0, err
    assert settings.api_keys.names == list(FILE_KEYS) and settings.metrics_public and not settings.log_requests
    config.write_text("server:\n  metrics_public: 1\n")
    code, err, _ = serve("--config", str(config))
    assert code == 1 and "server.metrics_public must be bool" in err
