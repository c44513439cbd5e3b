"""Shared pieces of the distributed tests: tiny checkpoints, an HF reference, a workload arriving over time."""

from __future__ import annotations

import os
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from conftest import no_special_tokens, save_tiny_model, tiny_llama_config
from dist_infer import SamplingParams

MODELS = {
    # tp=2 splits the 2 K/V heads.
    "llama-kv2": lambda: (tiny_llama_config(num_hidden_layers=4, num_key_value_heads=2, vocab_size=151,
                                            tie_word_embeddings=False), 0.0),
    # tp=2 replicates the single K/V head.
    "llama-kv1": lambda: (tiny_llama_config(num_hidden_layers=4, num_key_value_heads=1, vocab_size=151), 0.0),
    "qwen2-bias": lambda: (Qwen2Config(vocab_size=163, hidden_size=48, intermediate_size=64, num_hidden_layers=4,
                                       num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                                       initializer_range=0.3, tie_word_embeddings=False, **no_special_tokens()), 0.3),
    # The table lives on stage 0 (embedding) and on the last stage (LM head).
    "llama-tied": lambda: (tiny_llama_config(num_hidden_layers=4, vocab_size=151, tie_word_embeddings=True), 0.0),
}


def build(name: str, root) -> tuple[str, list]:
    """Saves the model; returns its path and the HF greedy reference for the workload."""
    config, bias_std = MODELS[name]()
    path = save_tiny_model(config, root / name, bias_std=bias_std)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    reference = [hf.generate(torch.tensor([p]), max_new_tokens=m, do_sample=False)[0, len(p):].tolist()
                 for p, m, _ in workload(config.vocab_size)]
    return path, reference


def workload(vocab: int):
    """(prompt, max_tokens, arrival step): mixed lengths, three sharing a 32-token prefix."""
    g = torch.Generator().manual_seed(0)

    def rand(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    shared = rand(32)
    return [(rand(3), 12, 0), (shared + rand(9), 10, 0), (rand(70), 8, 1), (shared + rand(3), 12, 2),
            (rand(21), 14, 4), (shared + rand(15), 6, 5)]


def drive(llm, vocab: int) -> list[list[int]]:
    """Runs the workload on ``llm`` with each request arriving at its step."""
    return drive_items(llm, workload(vocab))


def drive_items(llm, items) -> list[list[int]]:
    """Adds each (prompt, max_tokens, arrival step) request at its step and steps the engine until all finish;
    returns the greedy tokens in item order."""
    return [out.token_ids for out in drive_outputs(llm, items)]


def drive_outputs(llm, items, **params):
    """``drive_items``, returning each request's final ``CompletionOutput``; ``params`` join the greedy
    ``SamplingParams`` (``logprobs=0``, say)."""
    engine = llm.engine
    finished, step = {}, 0
    while len(finished) < len(items):
        for i, (prompt, max_tokens, arrival) in enumerate(items):
            if arrival == step:
                engine.add_request(str(i), {"prompt_token_ids": prompt},
                                   SamplingParams(temperature=0, max_tokens=max_tokens, **params))
        for out in engine.step():
            if out.finished:
                finished[int(out.request_id)] = out.outputs[0]
        step += 1
        assert step < 2000, "requests did not finish"
    return [finished[i] for i in range(len(items))]


def hf_greedy_with_logprobs(hf, prompt: list[int], new_tokens: int):
    """HF greedy tokens, and the log-softmax of the logits that chose each one [new_tokens, vocab] (EOS does not
    stop it)."""
    hf.generation_config.eos_token_id = None
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                      output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = torch.stack([torch.log_softmax(step[0].float(), -1) for step in out.logits])
    return tokens, logprobs


def save_with_reference(config, path, items_of=None, **save_kwargs):
    """Saves a tiny random model for ``config``; returns (path, HF model, workload items, ``hf_reference``).
    ``items_of(vocab)`` gives the items (default: ``workload``)."""
    path = save_tiny_model(config, path, **save_kwargs)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    items = (items_of or workload)(config.vocab_size)
    return path, hf, items, hf_reference(hf, items)


def hf_reference(hf, items) -> list[tuple[list[int], torch.Tensor]]:
    """``hf_greedy_with_logprobs`` for each (prompt, max_tokens, _) item."""
    return [hf_greedy_with_logprobs(hf, prompt, max_tokens) for prompt, max_tokens, _ in items]


def assert_matches_reference(outputs, reference, atol: float = 1e-4) -> None:
    """``CompletionOutput``s (requested with ``logprobs``) against ``hf_reference``: tokens equal, and every
    logprob returned (the chosen token's and the top entries') within ``atol`` of HF's."""
    for out, (tokens, logprobs) in zip(outputs, reference):
        assert out.token_ids == tokens
        assert len(out.logprobs) == len(tokens)
        for step, entries in enumerate(out.logprobs):
            got = torch.tensor([entry.logprob for entry in entries.values()])
            torch.testing.assert_close(got, logprobs[step, list(entries)], atol=atol, rtol=0)


def finish_after_fault(engine, finished: dict, bound_s: float) -> None:
    """Steps ``engine`` until no request is left, collecting finished outputs into ``finished``; no output may
    carry an error, and it must be over within ``bound_s`` seconds."""
    start = time.monotonic()
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                finished[out.request_id] = out
        assert time.monotonic() - start < bound_s, "requests did not finish after the fault"


def hf_greedy_text(path: str, prompt: str, max_new_tokens: int) -> str:
    """Hugging Face's greedy continuation of ``prompt`` (EOS ignored), as the CLI prints it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    ids = tok(prompt, return_tensors="pt").input_ids
    return tok.decode(hf.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:],
                      skip_special_tokens=True).strip()


def vocab_of(name: str) -> int:
    return MODELS[name]()[0].vocab_size


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited; it only waits to be reaped
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, timeout: float, interval: float = 0.1) -> bool:
    """Polls ``condition`` until it holds or ``timeout`` seconds pass; returns whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def arm_step_failure(worker, after_steps: int) -> None:
    """Runs inside a worker (via collective_rpc): its step number ``after_steps + 1`` raises."""
    original, calls = worker.execute_model, [0]

    def failing(scheduler_output):
        calls[0] += 1
        if calls[0] > after_steps:
            raise RuntimeError("injected failure in a step")
        return original(scheduler_output)

    worker.execute_model = failing


def hang_in_step(worker) -> None:
    """Runs inside a worker (via collective_rpc): its next step never returns (it sleeps), as a worker stuck in
    a collective or a driver call would; only being killed ends it."""
    def hung(scheduler_output):
        time.sleep(3600)

    worker.execute_model = hung
