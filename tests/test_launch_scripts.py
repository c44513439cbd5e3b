"""The scripts in launch/ as a user runs them: a Ray head, a Ray job, and torchrun."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"


def _sh(*args, env=None, timeout=600):
    return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_ray_head_and_job_submission(default_model_path):
    started = _sh(LAUNCH / "ray_start_head.sh", "--num-cpus", "4")
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        job = _sh(LAUNCH / "ray_job_submit.sh", "--pp", "2", "--max-tokens", "16", "--max-model-len", "1024",
                  "What is the capital of France?")
        assert job.returncode == 0, (job.stdout[-2000:], job.stderr[-2000:])
        assert "Paris" in job.stdout
        assert "succeeded" in job.stdout + job.stderr
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)


@pytest.mark.slow
def test_torchrun_script(tiny_llama_with_tokenizer):
    single = subprocess.run(["dist-infer", "generate", "--model", tiny_llama_with_tokenizer, "--no-chat",
                             "--max-tokens", "10", "--kv-cache-memory", str(1 << 22), "Once"],
                            capture_output=True, text=True, timeout=300)
    result = _sh(LAUNCH / "torchrun_generate.sh", "--model", tiny_llama_with_tokenizer, "--no-chat", "--pp", "2",
                 "--max-tokens", "10", "--kv-cache-memory", str(1 << 22), "Once", env={"NPROC": "2"})
    assert single.returncode == 0 and result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == single.stdout.strip() != ""
