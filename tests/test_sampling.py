"""Sampling: reproducible seeds, batch independence, filters against transformers' own warpers, stops."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from conftest import save_tiny_model, tiny_llama_config
from dist_infer import LLM, SamplingParams
from dist_infer.layers.sampler import Sampler, SamplingBatch
from dist_infer.worker.request_state import CachedRequestState, build_sampling_batch


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    config = tiny_llama_config(vocab_size=97, intermediate_size=48, max_position_embeddings=128, initializer_range=0.2)
    return save_tiny_model(config, tmp_path_factory.mktemp("tiny_sampling"))


@pytest.fixture(scope="module")
def llm(tiny_path):
    return LLM(model=tiny_path, skip_tokenizer_init=True, kv_cache_memory=1 << 22)


def _ids(*lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, 97, (n,), generator=g).tolist()} for n in lengths]


def test_same_seed_same_tokens_and_other_seed_differs(llm):
    prompt = _ids(9)
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=24)
    first = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    other = llm.generate(prompt, SamplingParams(temperature=1.0, seed=99, max_tokens=24), use_tqdm=False)
    assert first == again
    assert other[0].outputs[0].token_ids != first


def test_seeded_request_does_not_depend_on_its_batch(llm):
    target = _ids(12, seed=5)[0]
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=7, max_tokens=24)
    alone = llm.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids
    others = _ids(3, 30, 17, seed=11)
    mixed_params = [SamplingParams(temperature=1.3, seed=1, max_tokens=10), SamplingParams(temperature=0, max_tokens=30),
                    params, SamplingParams(temperature=0.5, max_tokens=5, repetition_penalty=1.2)]
    batched = llm.generate([others[0], others[1], target, others[2]], mixed_params, use_tqdm=False)
    assert batched[2].outputs[0].token_ids == alone


def test_top_k_one_is_greedy(llm):
    prompts = _ids(4, 20)
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    top1 = llm.generate(prompts, SamplingParams(temperature=1.5, top_k=1, seed=3, max_tokens=16), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in greedy] == [o.outputs[0].token_ids for o in top1]


def test_repetition_penalty_matches_hf(tiny_path, llm):
    hf = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    for prompt in _ids(6, 25, seed=8):
        ids = prompt["prompt_token_ids"]
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, repetition_penalty=1.8)
        ours = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.8),
                            use_tqdm=False)[0].outputs[0].token_ids
        assert ours == ref[0, len(ids):].tolist()


def _batch(B, *, temperature=1.0, top_k=None, top_p=None, min_p=None):
    return SamplingBatch(
        temperature=torch.full((B,), temperature), greedy=torch.zeros(B, dtype=torch.bool), all_greedy=False,
        top_k=None if top_k is None else torch.full((B,), top_k),
        top_p=None if top_p is None else torch.full((B,), top_p),
        min_p=None if min_p is None else torch.full((B,), min_p),
        repetition_penalty=None, seen_tokens=None, generators=[None] * B, max_num_logprobs=None)


@pytest.mark.parametrize("kind,value,warper", [
    ("top_k", 7, TopKLogitsWarper(top_k=7)),
    ("top_p", 0.8, TopPLogitsWarper(top_p=0.8)),
    ("min_p", 0.15, MinPLogitsWarper(min_p=0.15)),
])
def test_filters_keep_the_same_tokens_as_transformers(kind, value, warper):
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    keep = Sampler._filter(logits, _batch(6, **{kind: value}))
    ref = torch.isfinite(warper(None, logits.clone()))
    assert torch.equal(keep, ref)


def test_sampled_frequencies_follow_the_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4).contiguous()
    tokens = Sampler()(logits, _batch(20000)).token_ids
    freq = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    assert torch.allclose(freq, probs, atol=0.015)


# Fixed logits over a small vocabulary, not sorted, with no near-ties at any top-p / min-p boundary below.
_LOGITS = torch.tensor([0.3, 2.0, -1.2, 1.4, -0.4, 0.9, -2.5, 0.6])
_SETTINGS = [dict(temperature=0.5), dict(temperature=1.0), dict(temperature=1.7),
             dict(temperature=0.7, top_p=0.8), dict(temperature=1.6, top_p=0.9), dict(temperature=1.5, min_p=0.12),
             dict(temperature=0.6, min_p=0.1), dict(temperature=1.3, top_k=5, top_p=0.9, min_p=0.05)]


def _expected_distribution(temperature, top_k=0, top_p=1.0, min_p=0.0):
    """softmax(logits / T) restricted to the tokens top-k, then top-p, then min-p keep, renormalized (fp64)."""
    probs = torch.softmax(_LOGITS.double() / temperature, dim=-1)
    order = probs.argsort(descending=True).tolist()
    kept = order[:top_k] if top_k else order
    mass = probs[kept] / probs[kept].sum()
    # top-p: the smallest prefix of the sorted (renormalized) distribution whose mass reaches top_p
    kept = [t for i, t in enumerate(kept) if i == 0 or mass[:i].sum() < top_p]
    # min-p: prob >= min_p * max prob (a ratio, the same before or after renormalizing)
    kept = [t for t in kept if probs[t] >= min_p * probs[order[0]]]
    out = torch.zeros_like(probs)
    out[kept] = probs[kept] / probs[kept].sum()
    return out


def _sample_rows(settings_per_row, seeded_rows=()):
    """One sampler step over a batch whose row i uses ``settings_per_row[i]``, built as the worker builds it."""
    states = [CachedRequestState(str(i), [], SamplingParams(max_tokens=1, seed=i if i in seeded_rows else None, **kw),
                                 [], 0)
              for i, kw in enumerate(settings_per_row)]
    batch = build_sampling_batch(states, len(_LOGITS), torch.device("cpu"))
    return Sampler()(_LOGITS.expand(len(states), -1).contiguous(), batch).token_ids


def _assert_follows(tokens, expected):
    """Every token's frequency within 5 standard errors of its probability; filtered tokens never drawn."""
    n = tokens.numel()
    freq = torch.bincount(tokens, minlength=len(expected)).double() / n
    tolerance = 5 * (expected * (1 - expected) / n).sqrt()
    assert torch.all(freq[expected == 0] == 0), (freq, expected)
    assert torch.all((freq - expected).abs() <= tolerance), (freq, expected)


@pytest.mark.parametrize("settings", _SETTINGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_sampled_frequencies_follow_softmax_of_logits_over_temperature(settings):
    """20,000 draws from one row of fixed logits follow softmax(logits / T), filtered and renormalized."""
    torch.manual_seed(0)
    _assert_follows(_sample_rows([settings] * 20000), _expected_distribution(**settings))


def test_each_row_of_a_mixed_batch_uses_its_own_settings():
    """All the settings interleaved in one batch (so every filter tensor is present and per row), a third of the
    rows drawing their noise from a generator seeded by their own seed and position: each setting's rows follow its distribution."""
    torch.manual_seed(1)
    n = 12000
    rows = [_SETTINGS[i % len(_SETTINGS)] for i in range(n * len(_SETTINGS))]
    tokens = _sample_rows(rows, seeded_rows=set(range(0, len(rows), 3)))
    for j, settings in enumerate(_SETTINGS):
        _assert_follows(tokens[j::len(_SETTINGS)], _expected_distribution(**settings))


def test_logprobs_hold_top_n_and_sampled_token(llm):
    out = llm.generate(_ids(10), SamplingParams(temperature=1.0, seed=5, max_tokens=8, logprobs=3), use_tqdm=False)
    completion = out[0].outputs[0]
    assert len(completion.logprobs) == len(completion.token_ids) == 8
    total = 0.0
    for token, entry in zip(completion.token_ids, completion.logprobs):
        assert token in entry
        ranked = sorted((lp for lp in entry.values() if lp.rank <= 3), key=lambda lp: lp.rank)
        assert [lp.rank for lp in ranked] == [1, 2, 3]
        assert ranked[0].logprob >= ranked[1].logprob >= ranked[2].logprob
        assert all(lp.logprob <= 0 for lp in entry.values())
        total += entry[token].logprob
    assert completion.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_max_tokens_and_stop_token_ids(llm):
    prompt = _ids(7)
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    assert len(free.token_ids) == 12 and free.finish_reason == "length"
    stop_at = free.token_ids[5]
    first = free.token_ids.index(stop_at)
    stopped = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at]),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_at


def test_eos_stops_unless_ignored(tiny_llama_with_tokenizer):
    llm = LLM(model=tiny_llama_with_tokenizer, kv_cache_memory=1 << 22)
    tok = llm.get_tokenizer()
    prompt = {"prompt_token_ids": tok.encode("Hello there, how are you")}
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    # Name one of the tokens the model produces as the engine's EOS.
    eos = free.outputs[0].token_ids[3]
    llm.engine.eos_token_ids = frozenset([eos])
    stopped = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids[-1] == eos and stopped.finish_reason == "stop" and stopped.stop_reason is None
    assert len(stopped.token_ids) <= 4
    ignored = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    assert ignored.outputs[0].token_ids == free.outputs[0].token_ids


def test_stop_strings_cut_the_text(tiny_llama_with_tokenizer):
    llm = LLM(model=tiny_llama_with_tokenizer, kv_cache_memory=1 << 22)
    prompt = "The weather today is"
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    text = free.outputs[0].text
    assert len(text) > 12
    stop = text[8:11]
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop],
                                               include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]
