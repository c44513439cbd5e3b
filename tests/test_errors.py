"""Bad input fails early with an error that names the problem."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from conftest import save_tiny_model, tiny_llama_config
from dist_infer import LLM, SamplingParams


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    config = tiny_llama_config(vocab_size=64, intermediate_size=48, max_position_embeddings=64)
    return save_tiny_model(config, tmp_path_factory.mktemp("tiny_errors"))


@pytest.fixture(scope="module")
def llm(tiny_path):
    return LLM(model=tiny_path, skip_tokenizer_init=True, kv_cache_memory=1 << 20)


def _edit_checkpoint(src: str, dst, edit) -> str:
    import shutil

    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return str(dst)


def test_unknown_architecture_names_the_supported_ones(tiny_path, tmp_path):
    import shutil

    shutil.copytree(tiny_path, tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"GPTNeoXForCausalLM.*supported: .*LlamaForCausalLM"):
        LLM(model=str(tmp_path / "m"), skip_tokenizer_init=True)


def test_missing_weight_file(tiny_path, tmp_path):
    import shutil

    shutil.copytree(tiny_path, tmp_path / "m")
    os.remove(tmp_path / "m" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LLM(model=str(tmp_path / "m"), skip_tokenizer_init=True)


def test_missing_model_folder():
    with pytest.raises(ValueError, match="model path not found"):
        LLM(model="/no/such/folder", skip_tokenizer_init=True)


def test_missing_tensor_is_named(tiny_path, tmp_path):
    path = _edit_checkpoint(tiny_path, tmp_path / "m", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing weights for: model\.layers\.1\.mlp\.gate_up_proj\.weight"):
        LLM(model=path, skip_tokenizer_init=True)


def test_unexpected_tensor_is_named(tiny_path, tmp_path):
    path = _edit_checkpoint(tiny_path, tmp_path / "m", lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        LLM(model=path, skip_tokenizer_init=True)


def test_shape_mismatch_is_named(tiny_path, tmp_path):
    path = _edit_checkpoint(tiny_path, tmp_path / "m",
                            lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(8, 32)))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*shape"):
        LLM(model=path, skip_tokenizer_init=True)


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0), ("top_k", -2), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("logprobs", -1), ("seed", 1.5), ("stop", [""]), ("stop_token_ids", [-3]),
])
def test_bad_sampling_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_empty_prompt_list_and_empty_prompt(llm):
    with pytest.raises(ValueError, match="prompts is empty"):
        llm.generate([], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)


def test_too_long_prompt_and_too_many_tokens(llm):
    with pytest.raises(ValueError, match=r"prompt is 64 tokens.*max_model_len=64"):
        llm.generate({"prompt_token_ids": [1] * 64}, use_tqdm=False)
    with pytest.raises(ValueError, match=r"max_tokens=20.*max_model_len=64"):
        llm.generate({"prompt_token_ids": [1] * 50}, SamplingParams(max_tokens=20), use_tqdm=False)


def test_token_ids_outside_vocabulary(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [3, 64]}, use_tqdm=False)


def test_failed_batch_leaves_nothing_queued(llm):
    with pytest.raises(ValueError):
        llm.generate([{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": []}], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_text_prompt_without_tokenizer(llm):
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        llm.generate("hello", use_tqdm=False)


def test_bad_engine_arguments(tiny_path):
    with pytest.raises(ValueError, match="dtype"):
        LLM(model=tiny_path, dtype="int3", skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(model=tiny_path, max_model_len=10_000, skip_tokenizer_init=True)
    with pytest.raises(TypeError, match="no_such_option"):
        LLM(model=tiny_path, no_such_option=1)
    with pytest.raises(ValueError, match="block_size"):
        LLM(model=tiny_path, block_size=0, skip_tokenizer_init=True)
