"""The Ray instance dist-infer starts for itself is private: every Ray process listens on loopback only, and
a client without the cluster's token is refused. Nothing joins a cluster that was not named."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import psutil
import pytest

from dist_infer.distributed.utils import local_ip_towards
from dist_infer.executor import ray_cluster

_JOIN = """
import sys, ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
    print("joined", ray.cluster_resources().get("CPU"))
except Exception as e:
    print("refused", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
"""


def _join(address: str, **env_changes) -> str:
    """What a second driver on this host gets: "joined ..." or "refused ..." with Ray's reason."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    # A client must dial loopback itself; left alone Ray swaps 127.0.0.1 for the host's address, not served.
    # A refused client retries its GCS reads 20 times, 2 s apart (Ray's default): twice tells as much.
    env.update(env_changes, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_NUM_REDIS_GET_RETRIES="2")
    out = subprocess.run([sys.executable, "-c", _JOIN, address], capture_output=True, text=True, timeout=120, env=env)
    return (out.stdout.strip().splitlines() or ["no answer"])[-1] + " | " + out.stderr[-3000:]


def _listening(procs) -> list[tuple[str, str, int]]:
    found = []
    for proc in procs:
        try:
            found += [(proc.name(), c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.slow
def test_the_executor_starts_ray_on_loopback_with_token_auth(tmp_path):
    import ray

    from conftest import tiny_llama_config, save_tiny_model
    from dist_infer import LLM, SamplingParams

    assert not ray.is_initialized()
    path = save_tiny_model(tiny_llama_config(), tmp_path / "m")
    with LLM(model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, distributed_executor_backend="ray",
             tensor_parallel_size=2) as llm:
        assert llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4))[0].outputs[0].token_ids
        gcs = ray.get_runtime_context().gcs_address
        me = psutil.Process()
        sockets = _listening([me, *me.children(recursive=True)])
        names = {name for name, _, _ in sockets}
        assert {"gcs_server", "raylet"} <= names, names  # the Ray processes are there and were inspected
        exposed = [s for s in sockets if s[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
        assert not exposed, exposed
        assert gcs.startswith("127.0.0.1:"), gcs

        token = open(ray_cluster.token_path()).read().strip()
        assert _join(gcs, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token).startswith("joined")
        for wrong in (dict(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64), dict(RAY_AUTH_MODE="disabled")):
            answer = _join(gcs, **wrong)
            assert answer.startswith("refused") and "InvalidAuthToken" in answer, answer
        # From the network the GCS port is closed: nothing listens on the host's own address.
        outside = local_ip_towards("10.255.255.255")
        if outside and not outside.startswith("127."):
            with pytest.raises(OSError):
                socket.create_connection((outside, int(gcs.rsplit(":", 1)[1])), timeout=5).close()
    assert not ray.is_initialized()  # the executor stopped the instance it started


def test_a_missing_token_is_created_for_the_owner_only(tmp_path, monkeypatch):
    target = tmp_path / "nested" / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(target))
    assert ray_cluster.ensure_auth_token() == target
    token = target.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert ray_cluster.ensure_auth_token() == target and target.read_text() == token  # kept, not replaced


def test_a_named_service_needs_a_named_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    from dist_infer import get_handle

    with pytest.raises(RuntimeError, match="pass --ray-address .* or set RAY_ADDRESS"):
        get_handle("nobody")


def test_joining_a_token_cluster_without_the_token_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "absent"))
    with pytest.raises(RuntimeError, match="no Ray token is here: copy the cluster's token to .*absent"):
        ray_cluster.connect("127.0.0.1:1")
