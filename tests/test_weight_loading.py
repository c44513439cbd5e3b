"""Checkpoints load from one file or shards, in any dtype, and give the same model."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config

from conftest import no_special_tokens, save_tiny_model
from dist_infer import LLM, SamplingParams


@pytest.fixture(scope="module")
def config():
    return Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       initializer_range=0.3, tie_word_embeddings=False, **no_special_tokens())


def _greedy(path, **kwargs):
    llm = LLM(model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, **kwargs)
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (4, 19)]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16),
                                                        use_tqdm=False)], llm


def test_sharded_checkpoint_equals_single_file(config, tmp_path):
    single = save_tiny_model(config, tmp_path / "single", bias_std=0.2)
    sharded = save_tiny_model(config, tmp_path / "sharded", bias_std=0.2, max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    assert _greedy(single)[0] == _greedy(sharded)[0]


def test_missing_shard_is_named(config, tmp_path):
    path = save_tiny_model(config, tmp_path / "sharded", max_shard_size="40KB")
    victim = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        LLM(model=path, skip_tokenizer_init=True)


@pytest.mark.parametrize("dtype,expected", [("auto", torch.bfloat16), ("float32", torch.float32),
                                            ("float16", torch.float16)])
def test_dtype_auto_takes_the_checkpoints(config, tmp_path, dtype, expected):
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(config, tmp_path / "fp32")
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tokens, llm = _greedy(str(tmp_path / "bf16"), dtype=dtype)
    model = llm.engine.executor.executor_of(0).worker.runner.model
    assert {p.dtype for p in model.parameters()} == {expected}
    assert all(len(t) == 16 for t in tokens)
