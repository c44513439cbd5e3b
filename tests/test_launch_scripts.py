"""The scripts in launch/ as a user runs them: a Ray head, a Ray job, and torchrun."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import stop_ray_head

LAUNCH = Path(__file__).resolve().parent.parent / "launch"


def _sh(*args, env=None, timeout=600):
    return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_nodes_and_clients_without_the_token_stop_and_say_where_it_goes(tmp_path):
    missing = {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "absent"), "RAY_AUTH_TOKEN": ""}
    for script, args in (("ray_start_worker.sh", ["127.0.0.1"]), ("ray_job_submit.sh", ["hi"]),
                         ("ray_generate.sh", ["hi"])):
        result = _sh(LAUNCH / script, *args, env=missing, timeout=60)
        assert result.returncode == 1, (script, result.stderr)
        assert f"no Ray authentication token at {tmp_path / 'absent'}" in result.stderr, (script, result.stderr)


@pytest.mark.slow
def test_ray_head_and_job_submission(default_model_path, tmp_path):
    # A machine that never ran Ray: the head creates the token (owner-only), the job client uses it.
    fresh = {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "ray" / "auth_token")}
    started = _sh(LAUNCH / "ray_start_head.sh", "--num-cpus", "4", env=fresh)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        token = tmp_path / "ray" / "auth_token"
        assert len(token.read_text()) == 64 and (token.stat().st_mode & 0o077) == 0
        job = _sh(LAUNCH / "ray_job_submit.sh", "--pp", "2", "--max-tokens", "16", "--max-model-len", "1024",
                  "What is the capital of France?", env=fresh)
        assert job.returncode == 0, (job.stdout[-2000:], job.stderr[-2000:])
        assert "Paris" in job.stdout
        assert "succeeded" in job.stdout + job.stderr
    finally:
        stop_ray_head()


@pytest.mark.slow
def test_torchrun_script(tiny_llama_with_tokenizer):
    single = subprocess.run(["dist-infer", "generate", "--model", tiny_llama_with_tokenizer, "--no-chat",
                             "--max-tokens", "10", "--kv-cache-memory", str(1 << 22), "Once"],
                            capture_output=True, text=True, timeout=300)
    result = _sh(LAUNCH / "torchrun_generate.sh", "--model", tiny_llama_with_tokenizer, "--no-chat", "--pp", "2",
                 "--max-tokens", "10", "--kv-cache-memory", str(1 << 22), "Once", env={"NPROC": "2"})
    assert single.returncode == 0 and result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == single.stdout.strip() != ""
