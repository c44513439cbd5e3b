"""Penalties and sampling limits (presence/frequency penalties, min_tokens, logit_bias, allowed_token_ids,
bad_words): greedy generation on a tiny random Llama equals a reference loop written here (Hugging Face logits
in fp32, each rule applied by hand, argmax), alone and batched; the sampler's processing on hand-made logits;
the worker's batch building; the engine's side (min_tokens before EOS and stop strings, bad word tokens);
validation."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import save_tiny_model, tiny_llama_config
from dist_infer import LLM, RequestOutputKind, SamplingParams
from dist_infer.engine.messages import EngineCoreOutput
from dist_infer.engine.output_processor import OutputProcessor
from dist_infer.engine.request import Request
from dist_infer.layers.sampler import Sampler
from dist_infer.worker.request_state import CachedRequestState, build_sampling_batch

V = 128
EOS = 3
NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    config = tiny_llama_config(vocab_size=V, eos_token_id=EOS, max_position_embeddings=128)
    return save_tiny_model(config, tmp_path_factory.mktemp("tiny_penalties"), seed=4)


@pytest.fixture(scope="module")
def hf(tiny_path):
    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(tiny_path):
    return LLM(model=tiny_path, skip_tokenizer_init=True, kv_cache_memory=1 << 22)


def _prompts(*lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def reference(hf, prompt, max_tokens, *, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0,
              min_tokens=0, logit_bias=None, allowed_token_ids=None, bad_words=(), stop_token_ids=(),
              ignore_eos=False, eos=(EOS,)):
    """Greedy tokens, one full forward per step, each rule applied by hand in vLLM's order: bias and masks,
    then the repetition penalty (over prompt and output), then OpenAI's ``logit - presence * (count > 0) -
    frequency * count`` over the generated tokens."""
    eos = () if ignore_eos else tuple(eos)
    out: list[int] = []
    while len(out) < max_tokens:
        z = hf(torch.tensor([prompt + out])).logits[0, -1].float().clone()
        vocab = z.shape[0]
        for t, b in (logit_bias or {}).items():
            z[t] += b
        if allowed_token_ids is not None:
            for t in range(vocab):
                if t not in allowed_token_ids:
                    z[t] = NEG_INF
        if len(out) < min_tokens:
            for t in (*eos, *stop_token_ids):
                z[t] = NEG_INF
        for word in bad_words:
            k = len(word) - 1
            if k <= len(out) and out[len(out) - k:] == list(word[:-1]):
                z[word[-1]] = NEG_INF
        if repetition_penalty != 1.0:
            for t in set(prompt + out):
                z[t] = z[t] / repetition_penalty if z[t] > 0 else z[t] * repetition_penalty
        for t, count in Counter(out).items():
            z[t] = z[t] - presence_penalty * (count > 0) - frequency_penalty * count
        token = int(z.argmax())
        out.append(token)
        if len(out) >= min_tokens and (token in eos or token in stop_token_ids):
            break
    return out


def _greedy(llm, prompts, settings, max_tokens=16):
    params = [SamplingParams(temperature=0, max_tokens=max_tokens, **s) for s in settings]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


# Each feature alone (and two combinations whose order matters), on greedy requests that ignore EOS.
FEATURES = {
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=1.2),
    "negative-presence-frequency": dict(presence_penalty=-1.0, frequency_penalty=0.6),
    "repetition-then-openai": dict(repetition_penalty=1.4, frequency_penalty=0.8, presence_penalty=0.5),
    "logit-bias": dict(logit_bias={5: 3.0, 17: 2.5, 40: -100.0, 77: 4.0}),
    "allowed": dict(allowed_token_ids=[2, 9, 14, 30, 31, 55, 70, 91, 100, 127]),
    "bias-allowed-penalty": dict(allowed_token_ids=[9, 14, 30, 31, 55, 91], logit_bias={9: 1.0, 55: -0.5},
                                 presence_penalty=2.0),
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_each_feature_matches_the_reference(llm, hf, feature):
    settings = dict(FEATURES[feature], ignore_eos=True)
    prompts = _prompts(5, 23, seed=8)
    ours = _greedy(llm, prompts, [settings] * len(prompts))
    expected = [reference(hf, p, 16, **settings) for p in prompts]
    assert ours == expected
    plain = [reference(hf, p, 16, ignore_eos=True) for p in prompts]
    assert ours != plain, "the setting changed nothing: the test would not notice it being ignored"
    if "allowed_token_ids" in settings:
        assert set(sum(ours, [])) <= set(settings["allowed_token_ids"])


def test_a_mixed_batch_equals_each_request_alone(llm, hf):
    """Rows with different settings and rows with none share a step: each gets exactly its own result."""
    prompts = _prompts(7, 3, 31, 12, 18, 9, seed=21)
    settings = [dict(), FEATURES["presence"], FEATURES["allowed"], dict(),
                dict(FEATURES["repetition-then-openai"], logit_bias={8: 2.0}), FEATURES["negative-presence-frequency"]]
    settings = [dict(s, ignore_eos=True) for s in settings]
    batched = _greedy(llm, prompts, settings, max_tokens=14)
    alone = [_greedy(llm, [p], [s], max_tokens=14)[0] for p, s in zip(prompts, settings)]
    assert batched == alone
    assert batched == [reference(hf, p, 14, **s) for p, s in zip(prompts, settings)]


def test_min_tokens_holds_back_a_forced_eos(llm, hf):
    """EOS biased to be the argmax everywhere: exactly min_tokens other tokens, then EOS ends the request."""
    prompt = _prompts(6, seed=2)[0]
    params = SamplingParams(temperature=0, max_tokens=20, min_tokens=5, logit_bias={EOS: 100.0})
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 6 and EOS not in out.token_ids[:5] and out.token_ids[5] == EOS
    assert out.finish_reason == "stop"
    assert out.token_ids == reference(hf, prompt, 20, min_tokens=5, logit_bias={EOS: 100.0})
    # Without min_tokens the same request ends at once; a forced stop token id is held back the same way.
    assert llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=20,
                        logit_bias={EOS: 100.0}), use_tqdm=False)[0].outputs[0].token_ids == [EOS]
    stop = SamplingParams(temperature=0, max_tokens=20, min_tokens=3, stop_token_ids=[60], logit_bias={60: 100.0})
    out = llm.generate([{"prompt_token_ids": prompt}], stop, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4 and out.token_ids[3] == 60 and 60 not in out.token_ids[:3]
    assert out.finish_reason == "stop" and out.stop_reason == 60


def test_min_tokens_with_ignore_eos_does_not_hold_eos(llm):
    """With ignore_eos, EOS is an ordinary token: min_tokens does not mask it (nor does it stop)."""
    prompt = _prompts(6, seed=2)[0]
    params = SamplingParams(temperature=0, max_tokens=6, min_tokens=4, ignore_eos=True, logit_bias={EOS: 100.0})
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [EOS] * 6 and out.finish_reason == "length"


def test_allowed_token_ids_bound_sampled_tokens(llm):
    allowed = [4, 8, 15, 16, 23, 42]
    params = SamplingParams(temperature=1.5, seed=3, max_tokens=40, ignore_eos=True, allowed_token_ids=allowed)
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts(4, 11, seed=5)], params, use_tqdm=False)
    tokens = [t for o in outs for t in o.outputs[0].token_ids]
    assert set(tokens) <= set(allowed) and len(set(tokens)) > 2


def test_seeded_sampling_with_penalties_is_reproducible_batch_and_preemption_independent(tiny_path, llm):
    prompts = _prompts(12, 40, 5, 27, seed=13)
    target = dict(temperature=0.9, top_p=0.95, seed=7, presence_penalty=0.8, frequency_penalty=0.5, min_tokens=4,
                  logit_bias={11: 1.5}, max_tokens=30)
    alone = llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(**target), use_tqdm=False)
    again = llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(**target), use_tqdm=False)
    assert alone[0].outputs[0].token_ids == again[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.2, seed=1, max_tokens=25, frequency_penalty=-0.5),
              SamplingParams(temperature=0, max_tokens=12),
              SamplingParams(temperature=0.7, max_tokens=20, repetition_penalty=1.2, allowed_token_ids=[1, 2, 11])]
    batched = llm.generate([{"prompt_token_ids": p} for p in prompts], [SamplingParams(**target), *others],
                           use_tqdm=False)
    assert batched[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    # A cache so small that requests are preempted and recomputed: the same tokens.
    tight = LLM(model=tiny_path, skip_tokenizer_init=True, num_gpu_blocks_override=12, block_size=8,
                max_model_len=80, max_num_batched_tokens=24)
    seeded = [SamplingParams(**dict(target, seed=i)) for i in range(4)]
    roomy = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], seeded,
                                                           use_tqdm=False)]
    squeezed = [o.outputs[0].token_ids for o in tight.generate([{"prompt_token_ids": p} for p in prompts], seeded,
                                                               use_tqdm=False)]
    assert tight.engine.get_stats().num_preemptions > 0
    assert squeezed == roomy
    tight.shutdown()


# ---- bad words, with a real tokenizer ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok_llm(tiny_llama_with_tokenizer):
    return LLM(model=tiny_llama_with_tokenizer, kv_cache_memory=1 << 22)


def _variants(tok, word):
    """vLLM's token sequences of a bad word: as given (leading spaces stripped) and after one space."""
    return {tuple(tok.encode(w, add_special_tokens=False)) for w in (word.lstrip(), " " + word.lstrip())}


def _contains(seq, sub):
    return any(list(seq[i:i + len(sub)]) == list(sub) for i in range(len(seq) - len(sub) + 1))


def test_bad_words_never_appear(tiny_llama_with_tokenizer, tok_llm):
    tok = AutoTokenizer.from_pretrained(tiny_llama_with_tokenizer)
    hf_tok = AutoModelForCausalLM.from_pretrained(tiny_llama_with_tokenizer, dtype=torch.float32).eval()
    prompt = tok.encode("The quick brown fox jumps over the lazy dog and", add_special_tokens=False)
    base = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = tok_llm.generate([{"prompt_token_ids": prompt}], base, use_tqdm=False)[0].outputs[0].token_ids
    # A two-token word the model produced after a space, so that only its spaced spelling bans those tokens.
    word = None
    for a, b in zip(plain, plain[1:]):
        text = tok.decode([a, b])
        if (text.startswith(" ") and text.strip() and tuple(tok.encode(text, add_special_tokens=False)) == (a, b)
                and tuple(tok.encode(text.strip(), add_special_tokens=False)) != (a, b)):
            word = text.strip()
            break
    assert word is not None, f"no two-token word to ban in {plain}"
    single = tok.decode([plain[0]]).strip()  # and the first token, as a one-token word
    assert single and all(len(v) == 1 for v in _variants(tok, single))
    for banned in ([word], [single]):  # apart: banning the first token changes all that follows
        # FINAL_ONLY: LLM.generate passes this very object to the engine (no dataclasses.replace on the way).
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, bad_words=banned,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        out = tok_llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids
        sequences = _variants(tok, banned[0])
        assert not any(_contains(out, s) for s in sequences), (banned, out)
        assert out != plain
        assert out == reference(hf_tok, prompt, 24, bad_words=sequences, ignore_eos=True)
        # The caller's params were not filled in (the engine works on a copy).
        assert params.bad_words_token_ids == []


# ---- the sampler on hand-made logits -------------------------------------------------------------------------

def _state(prompt, output, num_prompt=None, **params):
    """A worker's state for a request (greedy unless told) with ``output`` generated after ``prompt``."""
    params.setdefault("temperature", 0.0)
    tokens = list(prompt) + list(output)
    return CachedRequestState("r", tokens, SamplingParams(max_tokens=50, **params), [], 0,
                              len(prompt) if num_prompt is None else num_prompt, (EOS,))


def test_process_logits_applies_each_rule_in_order_on_hand_made_logits():
    torch.manual_seed(0)
    vocab = 20
    logits = torch.randn(5, vocab) * 3
    states = [
        _state([1, 2], [4, 4, 7], presence_penalty=0.5, frequency_penalty=1.0, repetition_penalty=1.5,
               logit_bias={4: 2.0, 9: -1.0}),
        _state([6], [6, 6], min_tokens=5, stop_token_ids=[12]),  # EOS and 12 held back
        _state([3], [], allowed_token_ids=[0, 5, 6, 19], logit_bias={5: 10.0}),
        _state([2, 2], [8]),  # nothing
        _state([11, 12], [13, 14], bad_words=["x"], frequency_penalty=-0.5),
    ]
    states[4].sampling_params.bad_words_token_ids = [[14, 15], [13, 16], [17]]  # 15 and 17 blocked, 16 not
    batch = build_sampling_batch(states, vocab, torch.device("cpu"))
    before = logits.clone()
    got = Sampler().process_logits(logits, batch)
    assert torch.equal(logits, before)  # the model's logits are left alone
    want = logits.clone()
    w = want[0]
    w[4] += 2.0
    w[9] -= 1.0
    for t in {1, 2, 4, 7}:
        w[t] = w[t] / 1.5 if w[t] > 0 else w[t] * 1.5
    w[4] = w[4] - 0.5 - 1.0 * 2
    w[7] = w[7] - 0.5 - 1.0 * 1
    want[1, EOS] = want[1, 12] = NEG_INF
    want[2, 5] += 10.0
    for t in range(vocab):
        if t not in (0, 5, 6, 19):
            want[2, t] = NEG_INF
    want[4, 15] = want[4, 17] = NEG_INF
    want[4, 13] += 0.5
    want[4, 14] += 0.5
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # Greedy rows choose from the processed logits; log-probabilities stay those of the raw logits.
    states[3].sampling_params.logprobs = 2
    batch = build_sampling_batch(states, vocab, torch.device("cpu"))
    out = Sampler()(logits, batch)
    assert out.token_ids.tolist() == want.argmax(dim=-1).tolist()
    raw = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.sampled_logprobs, raw.gather(1, out.token_ids.unsqueeze(1)).squeeze(1))


def test_sampled_rows_never_draw_masked_tokens():
    vocab = 12
    logits = torch.zeros(4000, vocab)
    # Uniform over the allowed tokens, less EOS (3) and the stop id held back by min_tokens.
    state = _state([0], [], temperature=1.0, allowed_token_ids=[1, 2, 3, 4, 5], min_tokens=1, stop_token_ids=[2])
    tokens = Sampler()(logits, build_sampling_batch([state] * 4000, vocab, torch.device("cpu"))).token_ids
    assert set(tokens.tolist()) == {1, 4, 5}


def test_only_rows_with_a_feature_pay_for_it():
    plain = [_state([1, 2, 3], [4, 5]) for _ in range(3)]
    batch = build_sampling_batch(plain, 10, torch.device("cpu"))
    assert batch.logit_bias is batch.allowed is batch.blocked is batch.penalty_rows is batch.output_counts is None
    states = [plain[0], _state([1], [3, 3, 9], presence_penalty=1.0), plain[1]]
    batch = build_sampling_batch(states, 10, torch.device("cpu"))
    assert batch.penalty_rows.tolist() == [1] and batch.output_counts.shape == (1, 10)


def test_counts_cover_generated_tokens_only_also_when_resent_whole():
    """A request resent with prompt + output (a migration) counts the same output as one that never moved."""
    prompt, output = [5, 5, 6, 7], [6, 6, 8]
    moved = CachedRequestState("r", prompt + output, SamplingParams(frequency_penalty=1.0), [], 0, len(prompt), ())
    batch = build_sampling_batch([moved], 10, torch.device("cpu"))
    expected = torch.zeros(10)
    for t, c in Counter(output).items():
        expected[t] = c
    assert torch.equal(batch.output_counts[0], expected)


def test_bad_word_prefixes_match_generated_tokens_only():
    # [7, 8]'s prefix 7 ends the prompt, not the output: not blocked; once generated, it is.
    state = _state([1, 7], [], bad_words=["x"])
    state.sampling_params.bad_words_token_ids = [[7, 8]]
    assert build_sampling_batch([state], 10, torch.device("cpu")).blocked is None
    state.token_ids.append(7)
    rows, ids = build_sampling_batch([state], 10, torch.device("cpu")).blocked
    assert rows.tolist() == [0] and ids.tolist() == [8]


# ---- the engine's side ---------------------------------------------------------------------------------------

def test_a_migrated_request_tells_workers_its_original_prompt():
    from dist_infer.config import SchedulerConfig
    from dist_infer.engine.kv_cache_manager import KVCacheManager
    from dist_infer.engine.scheduler import Scheduler

    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=8, min_tokens=2), frozenset([EOS]), 8)
    for token in (9, 9):
        request.append_token(token)
    request.reset_for_migration()
    sched = Scheduler(SchedulerConfig(4, 64, 64), KVCacheManager(8, 4, enable_prefix_caching=True), 64)
    sched.add_request(request)
    new = sched.schedule().new_requests[0]
    assert new.token_ids == [1, 2, 3, 9, 9] and new.num_prompt_tokens == 3 and tuple(new.eos_token_ids) == (EOS,)
    state = CachedRequestState.from_new(new)
    assert state.num_output_tokens == 2


def test_check_stop_ignores_eos_and_stop_ids_before_min_tokens():
    request = Request("r", [1], SamplingParams(max_tokens=8, min_tokens=3, stop_token_ids=[5]), frozenset([EOS]), 8)
    for token in (EOS, 5):
        request.append_token(token)
        assert not request.check_stop()
    request.append_token(5)
    assert request.check_stop() and request.stop_reason == 5


@pytest.fixture(scope="module")
def smol_tok(default_model_path):
    return AutoTokenizer.from_pretrained(default_model_path)


# The text " is Lee, and I'm a student in the college", one token per piece (checked in the test).
_PIECES = [" is", " Lee", ",", " and", " I", "'m", " a", " student", " in", " the", " college"]


@pytest.mark.parametrize("min_tokens,stop,text", [
    (0, "e", " is L"),
    (5, "e", " is Lee, and I'm a stud"),  # vLLM's own example: the e's of the first 5 tokens do not stop
    (5, "I'm", " is Lee, and "),  # a stop string that starts in the first min_tokens tokens and ends after
    (6, "I'm", " is Lee, and I'm a student in the college"),  # wholly inside them: never stops
    (2, ",", " is Lee"),
    (2, ["college", "e"], " is Lee, and I'm a stud"),  # each stop string searched from where it could end
])
def test_min_tokens_holds_back_stop_strings(smol_tok, min_tokens, stop, text):
    ids = [smol_tok.encode(p, add_special_tokens=False) for p in _PIECES]
    assert all(len(i) == 1 for i in ids)
    ids = [i[0] for i in ids]
    processor = OutputProcessor(smol_tok)
    prompt = smol_tok.encode("Hello, my name", add_special_tokens=False)
    processor.add_request("r", None, prompt, SamplingParams(stop=stop, min_tokens=min_tokens, max_tokens=50))
    final = None
    for i, token in enumerate(ids):  # one token a step; the last one ends the request by length
        outputs, _ = processor.process([EngineCoreOutput("r", [token], finish_reason="length" if i == 10 else None)])
        final = outputs[-1]
        if final.finished:
            break
    assert final.outputs[0].text == text
    # Several tokens in one output (as after a burst) give the same text.
    processor.add_request("s", None, prompt, SamplingParams(stop=stop, min_tokens=min_tokens, max_tokens=50))
    outputs, _ = processor.process([EngineCoreOutput("s", ids[:4]),
                                    EngineCoreOutput("s", ids[4:], finish_reason="length")])
    assert outputs[-1].finished and outputs[-1].outputs[0].text == text


# ---- validation --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(frequency_penalty="1"), "frequency_penalty"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=9, max_tokens=8), "min_tokens"),
    (dict(logit_bias={1: 101.0}), "logit_bias"),
    (dict(logit_bias={"a": 1.0}), "logit_bias"),
    (dict(logit_bias=[1, 2]), "logit_bias"),
    (dict(allowed_token_ids=[]), "allowed_token_ids"),
    (dict(allowed_token_ids=[3, -1]), "allowed_token_ids"),
    (dict(bad_words=[""]), "bad_words"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(allowed_token_ids=[1, V]), "allowed_token_ids"),
    (dict(logit_bias={V + 5: 1.0}), "logit_bias"),
    (dict(bad_words=["hello"]), "bad_words"),  # no tokenizer to spell it with
])
def test_engine_rejects_what_it_cannot_apply(llm, kwargs, field):
    with pytest.raises(ValueError, match=field):
        llm.generate([{"prompt_token_ids": [1, 2]}], SamplingParams(**kwargs), use_tqdm=False)
