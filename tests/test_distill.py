"""Knowledge distillation (``dist-infer distill``): the top-k KL, the teacher's targets from the engine against
Hugging Face (and at tp=2 against tp=1), the student's loss and held-out KL falling, a SIGKILLed run resuming to
the same weights as an unbroken one, data-parallel training under torchrun, and the final folder loading in
transformers and dist-infer alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import save_tiny_model
from dist_infer.distill import DistillConfig, distill
from dist_infer.distill.data import load_texts, split_heldout, token_windows
from dist_infer.distill.loss import topk_kl
from dist_infer.distill.teacher import compute_targets
from dist_infer.engine.arg_utils import EngineArgs

SEQ_LEN = 32
TEXTS = 24  # calibration passages: ~1k tokens, 30-odd windows of 32


def _config(layers: int, hidden: int = 32) -> LlamaConfig:
    return LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=True, initializer_range=0.5, bos_token_id=1, eos_token_id=2,
                       pad_token_id=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory, default_model_path):
    root = tmp_path_factory.mktemp("distill")
    teacher = save_tiny_model(_config(4), root / "teacher", tokenizer_dir=default_model_path)
    student = save_tiny_model(_config(2), root / "student", seed=1, tokenizer_dir=default_model_path)
    return teacher, student, root


@pytest.fixture(scope="module")
def windows(models):
    from transformers import AutoTokenizer

    return token_windows(AutoTokenizer.from_pretrained(models[0]), load_texts(["calibration"], max_texts=TEXTS),
                         SEQ_LEN)


def _run_config(root, name: str, student: str | None, **overrides) -> DistillConfig:
    values = dict(output_dir=str(root / name), student=student, data=["calibration"], max_texts=TEXTS,
                  seq_len=SEQ_LEN, batch_size=2, grad_accumulation=2, max_steps=8, eval_every=4, save_every=4,
                  lr=1e-2, warmup_ratio=0.1, cache_dir=str(root / "cache"), show_progress=False)
    values.update(overrides)
    return DistillConfig(**values)


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(str(folder), "model.safetensors"))


# ---- the loss -------------------------------------------------------------------------------------------------
def test_topk_kl_is_zero_at_the_teacher_and_equals_the_formula():
    g = torch.Generator().manual_seed(0)
    teacher_logits, student_logits = torch.randn(3, 5, 50, generator=g) * 2, torch.randn(3, 5, 50, generator=g)
    p_log = torch.log_softmax(teacher_logits, -1)
    top_lp, top_ids = p_log.topk(6, dim=-1)
    assert topk_kl(teacher_logits, top_ids, top_lp).abs().max() < 1e-6
    q_log = torch.log_softmax(student_logits, -1)
    # reference: the 6 top tokens plus one "rest" outcome, from the full distributions
    q6, p6 = q_log.gather(-1, top_ids).exp(), top_lp.exp()
    p = torch.cat([p6, 1 - p6.sum(-1, keepdim=True)], -1)
    q = torch.cat([q6, 1 - q6.sum(-1, keepdim=True)], -1)
    forward, reverse = (p * (p / q).log()).sum(-1), (q * (q / p).log()).sum(-1)
    torch.testing.assert_close(topk_kl(student_logits, top_ids, top_lp), forward, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(topk_kl(student_logits, top_ids, top_lp, "reverse_kl"), reverse, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(topk_kl(student_logits, top_ids, top_lp, "mixed", 0.25),
                               0.25 * forward + 0.75 * reverse, atol=1e-5, rtol=1e-4)
    assert (forward > 0).all() and (reverse > 0).all()


# ---- the teacher ----------------------------------------------------------------------------------------------
def _hf_topk(folder: str, windows: torch.Tensor, k: int):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=windows).logits[:, :-1].float(), -1)
    values, ids = logprobs.topk(k, dim=-1)
    return ids, values


def test_teacher_topk_logprobs_equal_hugging_face(models, windows):
    teacher = models[0]
    rows = windows[:6]
    targets = compute_targets(EngineArgs(model=teacher, dtype="float32"), rows, 5, show_progress=False)
    ids, values = _hf_topk(teacher, rows, 5)
    assert targets.top_ids.shape == (6, SEQ_LEN - 1, 5)
    assert torch.equal(targets.top_ids.long(), ids)
    torch.testing.assert_close(targets.top_logprobs, values, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_teacher_targets_at_tp2_equal_tp1(models, windows):
    rows = windows[:8]
    one = compute_targets(EngineArgs(model=models[0], dtype="float32"), rows, 8, show_progress=False)
    two = compute_targets(EngineArgs(model=models[0], dtype="float32", tensor_parallel_size=2,
                                     distributed_executor_backend="mp"), rows, 8, show_progress=False)
    assert torch.equal(one.top_ids, two.top_ids)
    torch.testing.assert_close(one.top_logprobs, two.top_logprobs, atol=1e-4, rtol=0)


# ---- training -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unbroken(models):
    teacher, student, root = models
    config = _run_config(root, "unbroken", student)
    return config, distill(EngineArgs(model=teacher, dtype="float32"), config)


def test_distillation_lowers_the_loss_and_the_heldout_kl(unbroken, models, windows):
    config, summary = unbroken
    log = [entry for entry in summary and _log(config)]
    assert summary["final"]["heldout_kl"] < 0.95 * summary["initial"]["heldout_kl"]
    assert log[-1]["train_loss"] < log[1]["train_loss"]
    train, held = split_heldout(len(windows), config.heldout_fraction, config.seed)
    assert summary["windows"] == {"train": len(train), "heldout": len(held), "seq_len": SEQ_LEN}
    assert set(train.tolist()).isdisjoint(held.tolist())


def _log(config) -> list[dict]:
    with open(os.path.join(config.output_dir, "distill_summary.json"), encoding="utf-8") as f:
        json.load(f)
    from dist_infer.distill.checkpoint import latest_checkpoint

    return torch.load(latest_checkpoint(config.output_dir) / "trainer_state.pt", weights_only=False)["extra"]["log"]


KILL_SCRIPT = """
import json, os, signal, sys
from dist_infer.distill import Callback, DistillConfig, distill
from dist_infer.engine.arg_utils import EngineArgs

class KillAfter(Callback):
    def on_step_end(self, step, metrics):
        if step == 6:  # after the step-4 checkpoint, before the step-8 one: steps 5 and 6 are lost
            os.kill(os.getpid(), signal.SIGKILL)

distill(EngineArgs(model=sys.argv[1], dtype="float32"), DistillConfig(**json.loads(sys.argv[2])), [KillAfter()])
"""


def test_a_killed_run_resumes_to_the_same_weights(unbroken, models):
    from dist_infer.distill.checkpoint import latest_checkpoint

    teacher, student, root = models
    config = replace(unbroken[0], output_dir=str(root / "killed"))
    run = subprocess.run([sys.executable, "-c", KILL_SCRIPT, teacher, json.dumps(asdict(config))],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]
    assert latest_checkpoint(config.output_dir).name == "step-00000004"
    assert not os.path.exists(os.path.join(config.output_dir, "config.json")), "the killed run did not finish"
    resumed = distill(EngineArgs(model=teacher, dtype="float32"), config)
    expected, got = _weights(unbroken[0].output_dir), _weights(config.output_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert resumed["final"] == unbroken[1]["final"]


@pytest.mark.slow
def test_torchrun_trains_data_parallel_like_one_process_with_accumulation(unbroken, models):
    """2 ranks x 2 windows per micro-step see the same 4 windows per step as 1 process x 2 micro-steps of 2."""
    teacher, student, root = models
    out = root / "ddp"
    args = ["--no-python", "dist-infer", "distill", str(out), "--student", student, "--teacher", teacher,
            "--dtype", "float32", "--data", "calibration", "--max-texts", str(TEXTS), "--seq-len", str(SEQ_LEN),
            "--batch-size", "2", "--grad-accumulation", "1", "--max-steps", "8", "--lr", "1e-2",
            "--warmup-ratio", "0.1", "--eval-every", "4", "--save-every", "4", "--cache-dir", str(root / "cache")]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "held-out KL" in run.stdout
    with open(out / "distill_summary.json", encoding="utf-8") as f:
        assert json.load(f)["world_size"] == 2
    expected, got = _weights(unbroken[0].output_dir), _weights(out)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-4, rtol=1e-3, msg=name)


def test_the_student_folder_loads_in_transformers_and_dist_infer(unbroken):
    from dist_infer import LLM, SamplingParams

    folder = unbroken[0].output_dir
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = [5, 77, 901, 33, 4000]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    with LLM(model=folder, dtype="float32", kv_cache_memory=1 << 22) as llm:
        out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=6, temperature=0,
                                                                         ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == expected


def test_the_command_distills_a_layer_dropped_copy_of_the_teacher(models, capsys):
    """``dist-infer distill OUT --drop-layers 1``: the student is the teacher less its block of least influence."""
    from dist_infer.entrypoints.cli import main

    teacher, _, root = models
    out = root / "dropped"
    code = main(["distill", str(out), "--drop-layers", "1", "--teacher", teacher, "--dtype", "float32",
                 "--data", "calibration", "--max-texts", str(TEXTS), "--seq-len", str(SEQ_LEN), "--max-steps", "2",
                 "--batch-size", "2", "--grad-accumulation", "1", "--cache-dir", str(root / "cache")])
    assert code == 0
    assert "held-out KL" in capsys.readouterr().out
    with open(out / "distill_summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    assert len(summary["dropped_layers"]) == 1 and summary["dropped_layers"][0] != 3  # the last block stays
    student = AutoModelForCausalLM.from_pretrained(str(out))
    assert student.config.num_hidden_layers == 3
    assert os.path.isfile(out / "tokenizer.json")


# ---- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (dict(drop_layers=0.25), "exactly one of student"),
    (dict(loss="kl"), "loss must be one of"),
    (dict(data=["nowhere.txt"]), "neither calibration nor stdlib"),
    (dict(seq_len=1), "seq_len must be an int >= 2"),
    (dict(heldout_fraction=0.0), "heldout_fraction must be in"),
    (dict(kl_mix=1.5), "kl_mix must be in"),
    (dict(top_k=0), "top_k must be an int >= 1"),
])
def test_bad_configs_name_the_problem(models, overrides, message):
    with pytest.raises(ValueError, match=message):
        _run_config(models[2], "bad", models[1], **overrides)
    with pytest.raises(ValueError, match="exactly one of student"):
        _run_config(models[2], "bad", None)


def test_a_student_with_another_tokenizer_is_refused(models, tmp_path, tiny_llama_config_path):
    config = _run_config(models[2], "other", tiny_llama_config_path, max_steps=1)
    with pytest.raises(ValueError, match="vocab_size=128 is smaller than the teacher's tokenizer"):
        distill(EngineArgs(model=models[0], dtype="float32"), config)


@pytest.fixture
def tiny_llama_config_path(tmp_path):
    from conftest import tiny_llama_config

    return save_tiny_model(tiny_llama_config(), tmp_path / "small_vocab")


def test_jsonl_data_is_read_by_field_and_bad_lines_are_named(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second", "id": 2}) + "\n")
    assert load_texts([str(good)]) == ["first", "second"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a string 'text' field"):
        load_texts([str(bad)])
