"""The dist-infer command under torchrun and Ray, as users start it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from parallel_helpers import hf_greedy_text

CLI = [sys.executable, "-m", "dist_infer.entrypoints.cli"]


def _run(args, timeout=600):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_torchrun_tp2_matches_hf(tiny_llama_with_tokenizer):
    prompt = "The history of computing"
    expected = hf_greedy_text(tiny_llama_with_tokenizer, prompt, 12)
    # --standalone: a free rendezvous port, so a torchrun of another test module running beside this one can't clash
    result = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "dist_infer.launch",
                   "generate", "--model", tiny_llama_with_tokenizer, "--no-chat", "--tp", "2", "--max-tokens", "12",
                   "--kv-cache-memory", str(1 << 22), prompt])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == expected


def test_smollm2_tp2_names_the_valid_sizes(default_model_path):
    result = _run([*CLI, "generate", "--executor", "ray", "--tp", "2", "hi"], timeout=300)
    assert result.returncode != 0
    assert "tensor_parallel_size=2" in result.stderr and "valid sizes: 1, 3" in result.stderr
    assert "Traceback" not in result.stderr
