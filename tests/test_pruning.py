"""Offline pruning: exact magnitude sparsity, 2:4 patterns, structured head/channel removal valid for a tensor-parallel
size and driven by importance, and pruned checkpoints that load and match transformers token for token."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen2Config

from conftest import no_special_tokens, save_tiny_model, tiny_llama_config
from dist_infer import LLM, SamplingParams
from dist_infer.compression.pruning import PRUNING_METHODS, channels_to_remove, groups_to_remove, prune_checkpoint
from dist_infer.config import valid_tensor_parallel_sizes

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CALIBRATION = ["The quick brown fox jumps over the lazy dog while the scheduler keeps every request moving.",
               "Return a new list containing all items from the iterable in ascending order.",
               "Tensor parallelism splits each weight matrix across ranks and gathers the partial results."]


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(str(folder), "model.safetensors"))


def _config(folder) -> dict:
    with open(os.path.join(str(folder), "config.json"), encoding="utf-8") as f:
        return json.load(f)


def _is_pruned(name: str) -> bool:
    return name.endswith(".weight") and any(f".{p}." in name for p in PROJECTIONS)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    config = tiny_llama_config(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=80,
                               tie_word_embeddings=False)
    return save_tiny_model(config, tmp_path_factory.mktemp("prune_src"))


@pytest.fixture(scope="module")
def gqa_path(tmp_path_factory, tiny_llama_with_tokenizer):
    """8 query heads of 6 dims in 4 KV groups, intermediate 96, speaking SmolLM2's tokenizer (for calibration)."""
    config = tiny_llama_config(vocab_size=49152, hidden_size=48, num_attention_heads=8, num_key_value_heads=4,
                               intermediate_size=96)
    return save_tiny_model(config, tmp_path_factory.mktemp("prune_gqa"), tokenizer_dir=tiny_llama_with_tokenizer)


def test_unstructured_reaches_exact_sparsity_and_leaves_the_rest(tiny_path, tmp_path):
    summary = prune_checkpoint(tiny_path, str(tmp_path / "out"), "unstructured", sparsity=0.3, show_progress=False,
                               score="magnitude")
    before, after = _weights(tiny_path), _weights(tmp_path / "out")
    assert before.keys() == after.keys()
    pruned = [name for name in after if _is_pruned(name)]
    assert len(pruned) == 2 * len(PROJECTIONS) == summary["pruned_linears"]
    for name, w in after.items():
        if name in pruned:
            assert int((w == 0).sum()) == round(0.3 * w.numel()), name
            kept = w != 0
            torch.testing.assert_close(w[kept], before[name][kept], rtol=0, atol=0)
            # every dropped weight is no larger than every kept one
            assert before[name][~kept].abs().max() <= before[name][kept].abs().min(), name
        else:  # embeddings, norms, lm_head
            torch.testing.assert_close(w, before[name], rtol=0, atol=0)
    assert summary["method"] == "unstructured" and summary["achieved_sparsity"] == pytest.approx(0.3, abs=1e-3)


def test_two_four_keeps_the_two_largest_of_every_four(tiny_path, tmp_path):
    with pytest.warns(UserWarning, match="sparsity=0.3 is ignored"):
        summary = prune_checkpoint(tiny_path, str(tmp_path / "out"), "2:4", sparsity=0.3, show_progress=False,
                                   score="magnitude")
    before, after = _weights(tiny_path), _weights(tmp_path / "out")
    for name in filter(_is_pruned, after):
        w, w0 = after[name], before[name]
        groups = w.reshape(w.shape[0], -1, 4)
        assert ((groups == 0).sum(-1) >= 2).all(), name
        top2 = w0.abs().reshape(w.shape[0], -1, 4).topk(2, dim=-1).values
        torch.testing.assert_close(groups.abs().topk(2, dim=-1).values, top2, rtol=0, atol=0)
    assert summary["sparsity"] == 0.5 and summary["achieved_sparsity"] == pytest.approx(0.5)


def test_two_four_needs_input_dimension_divisible_by_four(tmp_path):
    src = save_tiny_model(tiny_llama_config(intermediate_size=66), tmp_path / "src")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*divisible by 4"):
        prune_checkpoint(src, str(tmp_path / "out"), "2:4", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_structured_shapes_config_and_tensor_parallel_validity(gqa_path, tmp_path):
    dest = tmp_path / "out"
    summary = prune_checkpoint(gqa_path, str(dest), "structured", sparsity=0.5, tensor_parallel_size=2,
                               calibration_texts=CALIBRATION, show_progress=False)
    config = _config(dest)
    heads, kv, inter = config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]
    assert (heads, kv, inter, config["head_dim"]) == (4, 2, 48, 6)
    assert summary == {**summary, "heads_before": 8, "heads_after": 4, "kv_heads_before": 4, "kv_heads_after": 2,
                       "intermediate_before": 96, "intermediate_after": 48}
    assert 2 in valid_tensor_parallel_sizes(heads, kv, inter)
    hidden, d = config["hidden_size"], config["head_dim"]
    expected = {"q_proj": (heads * d, hidden), "k_proj": (kv * d, hidden), "v_proj": (kv * d, hidden),
                "o_proj": (hidden, heads * d), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
                "down_proj": (hidden, inter)}
    before, after = _weights(gqa_path), _weights(dest)
    for name, w in after.items():
        proj = next((p for p in PROJECTIONS if f".{p}." in name), None)
        assert w.shape == (expected[proj] if proj else before[name].shape), name
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (dest / name).is_file(), name
    assert summary["achieved_sparsity"] == pytest.approx(0.5)


def test_structured_counts_adjust_to_tensor_parallel_size():
    assert groups_to_remove(8, 4, 0.5, 2) == 2
    assert groups_to_remove(12, 6, 0.5, 4) == 2  # 3 KV heads fit neither way for tp=4; 4 remain (8 heads)
    assert groups_to_remove(8, 4, 0.9, 1) == 3  # at least one group stays
    assert groups_to_remove(8, 2, 0.5, 8) == 0  # 1 KV head would leave 4 query heads for 8 ranks
    assert channels_to_remove(96, 0.5, 2) == 48
    assert channels_to_remove(1536, 0.3, 1) == 464  # 1072 remain: a multiple of 8 near 1536 - 461
    assert channels_to_remove(100, 0.5, 3) == 52  # 48 remain: 16 channels on each of 3 ranks
    assert channels_to_remove(20, 0.5, 3) == 11  # too small for 24: 9 remain, still divisible by 3
    with pytest.raises(ValueError, match="tensor_parallel_size=5"):
        groups_to_remove(8, 4, 0.5, 5)
    # LlamaConfig insists on hidden_size % num_attention_heads == 0: with hidden 32, 6 heads cannot be loaded
    assert groups_to_remove(8, 4, 0.25, 1, accepts=lambda heads, kv: 32 % heads == 0) == 0


def test_structured_impossible_tensor_parallel_size_raises(gqa_path, tmp_path):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=5.*num_attention_heads=8.*num_key_value_heads=4"):
        prune_checkpoint(gqa_path, str(tmp_path / "out"), "structured", tensor_parallel_size=5,
                         calibration_texts=CALIBRATION, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_structured_removes_the_least_important_group_and_channels(gqa_path, tmp_path):
    """Zeroed o_proj columns make a KV group useless (a different one per layer); zeroed down_proj columns make
    MLP channels useless: exactly those must go."""
    src = tmp_path / "src"
    src.mkdir()
    for name in os.listdir(gqa_path):
        if name != "model.safetensors":
            shutil.copy(os.path.join(gqa_path, name), src / name)
    weights, d, group = _weights(gqa_path), 6, 2  # head_dim 6, 2 query heads per KV head
    useless_group = {0: 1, 1: 3}
    useless_channels = {0: list(range(0, 96, 4)), 1: list(range(50, 74))}
    for layer, g in useless_group.items():
        weights[f"model.layers.{layer}.self_attn.o_proj.weight"][:, g * group * d:(g + 1) * group * d] = 0
        weights[f"model.layers.{layer}.mlp.down_proj.weight"][:, useless_channels[layer]] = 0
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})

    prune_checkpoint(str(src), str(tmp_path / "out"), "structured", sparsity=0.25, calibration_texts=CALIBRATION,
                     show_progress=False)
    after = _weights(tmp_path / "out")
    for layer, g in useless_group.items():
        prefix = f"model.layers.{layer}"
        kept_groups = [k for k in range(4) if k != g]
        k_rows = torch.cat([torch.arange(k * d, (k + 1) * d) for k in kept_groups])
        torch.testing.assert_close(after[f"{prefix}.self_attn.k_proj.weight"],
                                   weights[f"{prefix}.self_attn.k_proj.weight"][k_rows], rtol=0, atol=0)
        q_rows = torch.cat([torch.arange(k * group * d, (k + 1) * group * d) for k in kept_groups])
        torch.testing.assert_close(after[f"{prefix}.self_attn.o_proj.weight"],
                                   weights[f"{prefix}.self_attn.o_proj.weight"][:, q_rows], rtol=0, atol=0)
        kept = [c for c in range(96) if c not in useless_channels[layer]]
        torch.testing.assert_close(after[f"{prefix}.mlp.gate_proj.weight"],
                                   weights[f"{prefix}.mlp.gate_proj.weight"][kept], rtol=0, atol=0)
    # 6 heads of 6 dims no longer span hidden_size=48: dist-infer must follow the explicit head_dim
    _assert_greedy_parity(str(tmp_path / "out"), [[7, 8, 9], list(range(1000, 1029))])


def _assert_greedy_parity(path, prompts, new_tokens=12):
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    llm = LLM(model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 22)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)[0, len(prompt):]
        assert output.outputs[0].token_ids == ref.tolist(), f"prompt of {len(prompt)} tokens diverged"


@pytest.mark.parametrize("method", ["unstructured", "2:4"])
def test_masked_checkpoint_round_trips_through_dist_infer(tiny_path, tmp_path, method):
    dest = str(tmp_path / "out")
    prune_checkpoint(tiny_path, dest, method, sparsity=0.5, show_progress=False, score="magnitude")
    _assert_greedy_parity(dest, [[5, 17, 3, 99], list(range(40, 71))])


def test_structured_qwen2_with_biases_round_trips_through_dist_infer(tmp_path, tiny_llama_with_tokenizer):
    """Qwen2 has q/k/v biases and no explicit head_dim: both must survive slicing."""
    config = Qwen2Config(vocab_size=49152, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=256,
                         initializer_range=0.3, **no_special_tokens())
    src = save_tiny_model(config, tmp_path / "src", bias_std=0.3, tokenizer_dir=tiny_llama_with_tokenizer)
    dest = str(tmp_path / "out")
    summary = prune_checkpoint(src, dest, "structured", sparsity=0.4, tensor_parallel_size=2,
                               calibration_texts=CALIBRATION, show_progress=False)
    assert (summary["kv_heads_after"], summary["heads_after"], summary["intermediate_after"]) == (2, 4, 48)
    assert _config(dest)["head_dim"] == 8
    assert _weights(dest)["model.layers.0.self_attn.k_proj.bias"].shape == (16,)
    _assert_greedy_parity(dest, [[5, 17, 3, 99, 1000], list(range(300, 337))])


def test_half_precision_checkpoint_keeps_its_dtype(tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_llama_config(), dtype=torch.float32).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "src"))
    prune_checkpoint(str(tmp_path / "src"), str(tmp_path / "out"), "unstructured", show_progress=False,
                     score="magnitude")
    assert _config(tmp_path / "out")["dtype"] == "bfloat16"
    assert {w.dtype for w in _weights(tmp_path / "out").values()} == {torch.bfloat16}


def test_invalid_arguments_raise(tiny_path, tmp_path):
    with pytest.raises(ValueError, match="unknown pruning method 'random'.*" + ", ".join(PRUNING_METHODS)):
        prune_checkpoint(tiny_path, str(tmp_path / "out"), "random")
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="sparsity must be in"):
            prune_checkpoint(tiny_path, str(tmp_path / "out"), "unstructured", sparsity=bad)
    with pytest.raises(ValueError, match="not found"):
        prune_checkpoint(str(tmp_path / "missing"), str(tmp_path / "out"), "unstructured")
    with pytest.raises(ValueError, match="dest must differ"):
        prune_checkpoint(tiny_path, tiny_path, "unstructured")
    with pytest.raises(ValueError, match="unknown pruning score 'random'.*wanda, magnitude"):
        prune_checkpoint(tiny_path, str(tmp_path / "out"), "unstructured", score="random")
    with pytest.raises(ValueError, match="Wanda pruning measures activations on text and needs the tokenizer"):
        prune_checkpoint(tiny_path, str(tmp_path / "out"), "unstructured")  # no tokenizer files in tiny_path
