"""The ``dist-infer`` command, run as users run it."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ppl_reference import hf_perplexity

CLI = [sys.executable, "-m", "dist_infer.entrypoints.cli"]


def _run(*args, timeout=300):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_console_script_is_installed():
    assert shutil.which("dist-infer") is not None


@pytest.mark.slow
def test_stream_prints_the_same_text(tiny_llama_with_tokenizer):
    args = ["generate", "--model", tiny_llama_with_tokenizer, "--no-chat", "--max-tokens", "12",
            "--kv-cache-memory", str(1 << 22), "Tell me"]
    plain, streamed = _run(*args), _run(*args, "--stream")
    assert plain.returncode == 0 and streamed.returncode == 0, plain.stderr + streamed.stderr
    assert plain.stdout.strip() and plain.stdout.strip() == streamed.stdout.strip()


@pytest.mark.parametrize("args,needle", [
    (["generate", "--temperature", "-1", "hi"], "temperature"),
    (["generate", "--presence-penalty", "3", "hi"], "presence_penalty"),
    (["generate", "--frequency-penalty", "-2.5", "hi"], "frequency_penalty"),
    (["generate", "--min-tokens", "300", "hi"], "min_tokens"),
    (["generate", "--model", "/no/such/model", "hi"], "model path not found"),
    (["convert", "/no/such.gguf", "out"], "GGUF file not found"),
])
def test_errors_are_one_line_without_traceback(args, needle):
    result = _run(*args)
    assert result.returncode != 0
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback():
    result = _run("--debug", "generate", "--model", "/no/such/model", "hi")
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.slow
def test_two_concurrent_conversions_produce_one_complete_folder(tmp_path):
    from dist_infer.model_loader.resolve import default_model_gguf

    dest = tmp_path / "smollm2"
    procs = [subprocess.Popen([*CLI, "convert", str(default_model_gguf()), str(dest)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-500:] for r in results]
    assert {Path(r[0].strip()) for r in results} == {dest}
    names = {p.name for p in dest.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no half-written folder left behind
    config = json.loads((dest / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9 and config["num_key_value_heads"] == 3 and config["vocab_size"] == 49152
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(dest))
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


def test_quantize_prune_and_eval_ppl_commands(tiny_llama_with_tokenizer, tmp_path):
    """Each compression command writes a checkpoint the engine loads; eval-ppl scores the fixed corpus."""
    quantized, pruned = str(tmp_path / "int8"), str(tmp_path / "structured")
    result = _run("quantize", tiny_llama_with_tokenizer, quantized, "--method", "int8")
    assert result.returncode == 0, result.stderr
    assert "14 linear layers quantized to int8 (rtn)" in result.stdout
    result = _run("prune", tiny_llama_with_tokenizer, pruned, "--method", "structured", "--sparsity", "0.5",
                  "--tp", "2")
    assert result.returncode == 0, result.stderr
    assert "KV heads 2->1" in result.stdout and "MLP channels 64->32" in result.stdout
    scores = {}
    for name, path in (("full", tiny_llama_with_tokenizer), ("int8", quantized), ("structured", pruned)):
        result = _run("eval-ppl", path, "--max-tokens", "200", "--kv-cache-memory", str(1 << 22))
        assert result.returncode == 0, result.stderr
        assert "over 199 tokens" in result.stdout
        scores[name] = float(result.stdout.split("perplexity ")[1].split()[0])
    # the full model's score is Hugging Face's perplexity of the same tokens (one 200-token window)
    assert scores["full"] == pytest.approx(hf_perplexity(tiny_llama_with_tokenizer, 200, 512)[0], rel=1e-4)
    # mean negative log-likelihood per token (log of perplexity): int8 barely moves it; pruning moves it
    nll = {name: math.log(score) for name, score in scores.items()}
    assert abs(nll["int8"] - nll["full"]) < 0.01 * nll["full"]
    assert nll["structured"] != nll["full"]
    result = _run("prune", tiny_llama_with_tokenizer, str(tmp_path / "bad"), "--method", "structured",
                  "--sparsity", "1.5")
    assert result.returncode != 0 and "sparsity must be in [0, 1)" in result.stderr
