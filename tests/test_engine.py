"""The engine end to end on a tiny model: batching never changes a request's tokens; streaming text is exact."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_model, tiny_llama_config
from dist_infer import LLM, RequestOutputKind, SamplingParams
from dist_infer.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_model(tiny_llama_config(), tmp_path_factory.mktemp("tiny_engine"))


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, 128, (n,), generator=g).tolist()} for n in lengths]


def test_batched_equals_one_at_a_time_under_tight_limits(tiny_path):
    prompts = _prompts([3, 40, 7, 90, 1, 25, 60, 12])
    params = [SamplingParams(temperature=0, max_tokens=m) for m in (20, 5, 33, 12, 40, 8, 17, 25)]
    alone = LLM(model=tiny_path, skip_tokenizer_init=True, kv_cache_memory=1 << 22)
    expected = [alone.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    # Few sequences at once, a small token budget and a pool too small for all of them: requests queue and
    # join the running batch as others finish.
    tight = LLM(model=tiny_path, skip_tokenizer_init=True, max_num_seqs=3, max_num_batched_tokens=128, max_model_len=160,
                num_gpu_blocks_override=20, block_size=8)
    outputs = tight.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert tight.engine.get_stats().kv_blocks_free == 20


def test_step_loop_with_late_arrivals_and_abort(tiny_path):
    llm = LLM(model=tiny_path, skip_tokenizer_init=True, kv_cache_memory=1 << 22)
    engine = llm.engine
    prompts = _prompts([5, 30, 9], seed=4)
    params = SamplingParams(temperature=0, max_tokens=10)
    reference = [llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    engine.add_request("a", prompts[0], params)
    finished = {}
    for step in range(40):
        if step == 3:
            engine.add_request("b", prompts[1], params)
            engine.add_request("victim", prompts[2], SamplingParams(temperature=0, max_tokens=50))
        if step == 6:
            engine.abort_request("victim")
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        if not engine.has_unfinished_requests():
            break
    assert finished == {"a": reference[0], "b": reference[1]}
    stats = engine.get_stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_incremental_detokenizer_matches_full_decode(default_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_path)
    text = "Größe 日本語 ok 🙂 naïve — “quotes” <|im_end|> after"
    ids = tok.encode(text, add_special_tokens=False)
    prompt = tok.encode("Say:", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=True)
    pieces = [detok.step([t]) for t in ids]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)  # a split multi-byte character would show as U+FFFD


def test_streamed_text_only_grows_and_never_shows_a_stop_string(tiny_llama_with_tokenizer):
    llm = LLM(model=tiny_llama_with_tokenizer, kv_cache_memory=1 << 22)
    prompt = "A story about"
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0]
    text = full.outputs[0].text
    stop = text[15:19]
    engine = llm.engine
    engine.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=stop))
    seen = []
    while engine.has_unfinished_requests():
        seen += [o.outputs[0].text for o in engine.step()]
    for before, after in zip(seen, seen[1:]):
        assert after.startswith(before)
    assert all(stop not in s for s in seen)
    assert seen[-1] == text[: text.index(stop)]


def test_chat_uses_the_template(tiny_llama_with_tokenizer):
    llm = LLM(model=tiny_llama_with_tokenizer, kv_cache_memory=1 << 22)
    tok = llm.get_tokenizer()
    conversation = [{"role": "user", "content": "Hi!"}]
    out = llm.chat(conversation, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    expected = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert out[0].prompt == expected
    assert out[0].prompt_token_ids == tok.encode(expected, add_special_tokens=False)
    two = llm.chat([conversation, conversation + [{"role": "assistant", "content": "Hello"},
                                                  {"role": "user", "content": "Bye"}]],
                   SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(two) == 2 and two[0].outputs[0].token_ids == out[0].outputs[0].token_ids


def test_offline_results_are_whole_whatever_the_output_kind(tiny_llama_with_tokenizer):
    llm = LLM(model=tiny_llama_with_tokenizer, kv_cache_memory=1 << 22)
    prompts = ["The capital of France is", "Once upon a time"]

    def run(kind):
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, output_kind=kind)
        return [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason)
                for o in llm.generate(prompts, params, use_tqdm=False)]

    whole = run(RequestOutputKind.CUMULATIVE)
    assert all(len(ids) == 8 and text for text, ids, _ in whole)
    # Before the fix a DELTA request came back holding only its last token and its text.
    assert run(RequestOutputKind.DELTA) == whole
    assert run(RequestOutputKind.FINAL_ONLY) == whole


def test_stop_strings_without_a_tokenizer_are_refused(tiny_path):
    llm = LLM(model=tiny_path, skip_tokenizer_init=True, kv_cache_memory=1 << 22)
    # Before the fix the stop string was silently never matched (there is no text to match it in).
    with pytest.raises(ValueError, match=r"stop=\['end'\].*skip_tokenizer_init=True"):
        llm.generate(_prompts([4])[0], SamplingParams(max_tokens=4, stop="end"), use_tqdm=False)
    out = llm.generate(_prompts([4])[0], SamplingParams(max_tokens=4, stop_token_ids=[0]), use_tqdm=False)
    assert out[0].finished


def test_without_max_tokens_a_request_runs_to_the_end_of_the_context(tiny_path):
    # The tiny model has no EOS token, so only the context ends its requests.
    llm = LLM(model=tiny_path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, max_model_len=48)
    outputs = llm.generate(_prompts([5, 30, 47], seed=2), SamplingParams(temperature=0, max_tokens=None),
                           use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [43, 18, 1]
    assert [o.outputs[0].finish_reason for o in outputs] == ["length"] * 3
    assert [len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outputs] == [48] * 3


def test_eos_ids_come_from_generation_config_and_may_be_a_list(tmp_path):
    path = save_tiny_model(tiny_llama_config(), tmp_path / "eos")
    prompt = _prompts([6], seed=5)[0]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    reference = LLM(model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 22).generate(
        prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    # Llama 3 / Qwen style: several EOS ids in generation_config.json, which wins over config.json's. The second
    # id of the list is a token greedy decoding reaches at step k (and not before); the first never comes.
    k = next(i for i in range(3, len(reference)) if reference[i] not in reference[:i])
    never = next(t for t in range(128) if t not in reference and t not in prompt["prompt_token_ids"])
    config = json.loads((tmp_path / "eos" / "config.json").read_text())
    config["eos_token_id"] = reference[1]  # would stop at step 1 if config.json were read instead
    (tmp_path / "eos" / "config.json").write_text(json.dumps(config))
    (tmp_path / "eos" / "generation_config.json").write_text(json.dumps({"eos_token_id": [never, reference[k]]}))

    llm = LLM(model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 22)
    assert llm.engine.eos_token_ids == {never, reference[k]}
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=None), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == reference[:k + 1] and out.finish_reason == "stop"
    assert llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids == reference
