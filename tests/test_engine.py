"""The engine end to end on a tiny model: batching never changes a request's tokens; streaming text is exact."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_model, tiny_llama_config
from dist_infer import LLM, SamplingParams
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
