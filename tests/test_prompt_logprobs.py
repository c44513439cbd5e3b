"""Prompt logprobs (``SamplingParams.prompt_logprobs``, issue 13) equal Hugging Face's ``log_softmax`` of its
logits (fp32, CPU, same weights): single process with row-chunked logits, chunked prefill, a prefix-cache hit,
preemption, tensor and pipeline parallelism (mp), a replica migration (scheduler level); ``/v1/completions``
with ``echo`` and ``logprobs`` through the official ``openai`` client, ``max_tokens=0`` included; and
lm-eval-harness's ``local-completions`` model scoring a small multiple-choice task through the server."""

from __future__ import annotations

import json
import os

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import save_tiny_model
from dist_infer import LLM, SamplingParams
from parallel_helpers import MODELS as PARALLEL_MODELS
from server_helpers import ServerProcess
from test_parity_hf import CONFIGS

ATOL = 1e-4


def _rand_prompts(vocab: int, lengths, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    """[P, V]: row i is HF's log_softmax after token i, which scores token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)


def _assert_matches_hf(hf, prompt: list[int], entries, k: int) -> None:
    ref = _hf_logprobs(hf, prompt)
    assert entries is not None and len(entries) == len(prompt), "one entry per prompt token"
    assert entries[0] is None, "nothing predicts the first token"
    for j in range(1, len(prompt)):
        row, entry, token = ref[j - 1], entries[j], prompt[j]
        assert token in entry, f"position {j}: the prompt token is missing"
        assert abs(entry[token].logprob - row[token].item()) <= ATOL, f"position {j}"
        # Ranks and top ids are exact up to ties closer than ATOL: a logit that far from the token's may fall
        # on either side of it under a different (equally exact) summation order. (The upper count includes the
        # token itself.)
        lp = row[token].item()
        assert 1 + int((row > lp + ATOL).sum()) <= entry[token].rank <= int((row > lp - ATOL).sum()), \
            f"position {j}: rank"
        top = [t for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank) if lp.rank <= k]
        if k:
            assert len(top) == k, f"position {j}: top-{k} ids"
            torch.testing.assert_close(row[top], row.topk(k).values, atol=ATOL, rtol=0,
                                       msg=f"position {j}: top-{k} ids are not HF's best {k}")
        else:
            assert top in ([], [token]), f"position {j}: top-0 ids"
        assert len(entry) <= k + 1
        for t, lp in entry.items():
            assert abs(lp.logprob - row[t].item()) <= ATOL


# ---- the chunked math alone ------------------------------------------------------------------------------
def test_row_chunks_are_bounded_and_equal_one_full_softmax():
    from dist_infer.layers.logprobs import target_logprobs

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(23, 16, generator=g), torch.randn(97, 16, generator=g) * 3
    targets = torch.randint(0, 97, (23,), generator=g)
    seen = []

    def compute_logits(h):
        seen.append(h.shape[0])
        return h @ weight.T

    got = target_logprobs(hidden, targets, 4, compute_logits, 97, max_rows=5)
    assert max(seen) <= 5 and sum(seen) == 23  # never more than 5 rows of logits at once
    ref = torch.log_softmax(hidden @ weight.T, dim=-1)
    chosen = ref[torch.arange(23), targets]
    torch.testing.assert_close(got.logprobs, chosen, atol=ATOL, rtol=0)
    assert got.ranks.tolist() == [1 + int((ref[i] > chosen[i]).sum()) for i in range(23)]
    assert got.top_ids.tolist() == ref.topk(4).indices.tolist()
    torch.testing.assert_close(got.top_logprobs, ref.topk(4).values, atol=ATOL, rtol=0)


# ---- one process -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config, bias_std = CONFIGS["llama-gqa-untied"]
    path = save_tiny_model(config, tmp_path_factory.mktemp("prompt_lp"), bias_std=bias_std)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), config.vocab_size


def test_uni_matches_hf_with_row_chunks_and_mixed_requests(checkpoint, monkeypatch):
    import dist_infer.layers.logprobs as logprobs_module

    path, hf, vocab = checkpoint
    monkeypatch.setattr(logprobs_module, "MAX_LOGITS_ELEMENTS", 4 * vocab)  # 4 rows of logits at a time
    prompts = _rand_prompts(vocab, (1, 5, 23, 61))
    ks = [3, 0, 5, 2]
    llm = LLM(model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 24)
    params = [SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=k) for k in ks]
    params.append(SamplingParams(temperature=0, max_tokens=2))  # no prompt logprobs in the same batch
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts + [prompts[2]]], params, use_tqdm=False)
    for prompt, k, out in zip(prompts, ks, outputs):
        _assert_matches_hf(hf, prompt, out.prompt_logprobs, k)
    assert outputs[-1].prompt_logprobs is None


def _count_prompt_positions(llm) -> dict[str, int]:
    """Wraps the engine's output processor: counts the prompt positions each request was sent (duplicates
    included), to see that nothing is reported twice. ``llm``: an ``LLM`` or an ``LLMEngine``."""
    processor, counts = getattr(llm, "engine", llm).output_processor, {}
    original = processor.process

    def counting(core_outputs):
        for core in core_outputs:
            if core.prompt_logprobs is not None:
                counts[core.req_id] = counts.get(core.req_id, 0) + len(core.prompt_logprobs.logprobs)
        return original(core_outputs)

    processor.process = counting
    return counts


def test_chunked_prefill_assembles_the_chunks_in_order(checkpoint):
    path, hf, vocab = checkpoint
    prompts = _rand_prompts(vocab, (61, 40, 7), seed=5)
    llm = LLM(model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 24, max_num_batched_tokens=16)
    counts = _count_prompt_positions(llm)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2), use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        _assert_matches_hf(hf, prompt, out.prompt_logprobs, 2)
    # A 61-token prompt in chunks of at most 8 tokens (half the budget): its positions came in many pieces.
    assert sorted(counts.values()) == sorted(len(p) - 1 for p in prompts)
    assert llm.engine.get_stats().num_steps >= 61 // 8


def test_a_cached_prefix_still_gets_its_logprobs_and_fills_the_cache(checkpoint):
    path, hf, vocab = checkpoint
    shared = _rand_prompts(vocab, (48,), seed=7)[0]
    first, second = shared + [1, 2, 3], shared + [4, 5]
    llm = LLM(model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 24, block_size=16)
    plain = SamplingParams(temperature=0, max_tokens=2)
    scored = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    llm.generate([{"prompt_token_ids": first}], plain, use_tqdm=False)  # caches the shared 48 tokens
    out = llm.generate([{"prompt_token_ids": second}], scored, use_tqdm=False)[0]
    _assert_matches_hf(hf, second, out.prompt_logprobs, 1)
    # The same prompt again, scored: the second request asking for prompt logprobs also gets them all.
    again = llm.generate([{"prompt_token_ids": second}], scored, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0  # skipped the lookup (its positions need the hidden states)
    _assert_matches_hf(hf, second, again.prompt_logprobs, 1)
    # A scored request still fills the cache for others.
    reuse = llm.generate([{"prompt_token_ids": second}], plain, use_tqdm=False)[0]
    assert reuse.num_cached_tokens == 48 and reuse.outputs[0].token_ids == out.outputs[0].token_ids


def test_preempted_requests_report_their_prompt_logprobs_once(checkpoint):
    path, hf, vocab = checkpoint
    prompts = _rand_prompts(vocab, (70, 45, 33, 52, 20, 61), seed=11)
    llm = LLM(model=path, skip_tokenizer_init=True, num_gpu_blocks_override=30, block_size=8, max_model_len=240,
              max_num_batched_tokens=32)
    counts = _count_prompt_positions(llm)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=2),
                           use_tqdm=False)
    assert llm.engine.get_stats().num_preemptions > 0
    for prompt, out in zip(prompts, outputs):
        _assert_matches_hf(hf, prompt, out.prompt_logprobs, 2)
        assert counts[out.request_id] == len(prompt) - 1  # recomputed prompts are not scored again


def test_a_migrated_request_is_not_scored_again_nor_past_its_prompt():
    """Scheduler level: a request migrated mid-prompt resumes scoring where it stopped; one migrated after
    generating (its workers' "prompt" now holds its outputs) is scored no more."""
    from dist_infer.config import SchedulerConfig
    from dist_infer.engine.kv_cache_manager import KVCacheManager
    from dist_infer.engine.messages import ModelRunnerOutput, PromptLogprobs
    from dist_infer.engine.request import Request
    from dist_infer.engine.scheduler import Scheduler

    def scheduler():
        return Scheduler(SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=4), KVCacheManager(64, 4), 128)

    def step(sched):
        """One step as the workers would answer it: every span scored, a token where a sequence caught up."""
        out = sched.schedule()
        result = ModelRunnerOutput(prompt_logprobs={
            r: PromptLogprobs(lo, [-1.0] * (hi - lo), [1] * (hi - lo), [[]] * (hi - lo), [[]] * (hi - lo))
            for r, (lo, hi) in out.prompt_logprob_spans.items()})
        for r, n in out.num_scheduled_tokens.items():
            if sched.requests[r].num_computed_tokens + n == sched.requests[r].num_tokens:
                result.sampled_token_ids[r] = 99
        return out, sched.update_from_output(out, result)

    request = Request("r", list(range(2, 22)), SamplingParams(max_tokens=4, prompt_logprobs=0), frozenset(), 4)
    first = scheduler()
    first.add_request(request)
    out, _ = step(first)  # chunk of 4 tokens (half the budget)
    assert out.prompt_logprob_spans == {"r": (1, 5)}
    moved = first.take_all()[0]
    moved.reset_for_migration()
    second = scheduler()
    second.add_request(moved)
    spans = []
    while moved.num_output_tokens == 0:  # the prompt is recomputed from token 0
        out, _ = step(second)
        spans.append(out.prompt_logprob_spans.get("r"))
    assert spans[0] is None  # tokens 0..3 again: their positions were reported already
    assert spans[1][0] == 5 and spans[-1][1] == 20  # positions 5..19, each once, up to the first token
    assert all(a[1] == b[0] for a, b in zip(spans[1:], spans[2:]))
    moved = second.take_all()[0]
    moved.reset_for_migration()
    third = scheduler()
    third.add_request(moved)
    assert len(moved.token_ids) == 21  # its workers' "prompt" now holds its first output
    for _ in range(8):
        out, _ = step(third)
        assert not out.prompt_logprob_spans
    assert moved.num_output_tokens == 4


def test_requests_moved_by_a_drain_report_their_prompt_logprobs_once(checkpoint):
    """Engine level, dp=2 (mp): replica 1 drains with no time to finish, so its requests move to replica 0 --
    one mid-prompt, one already generating (its "prompt" there holds its output) -- and each reports every
    prompt position once, equal to HF's."""
    from dist_infer.engine.llm_engine import LLMEngine

    path, hf, vocab = checkpoint
    prompts = _rand_prompts(vocab, (61, 9), seed=17)
    engine = LLMEngine.from_engine_args(model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 22,
                                        distributed_executor_backend="mp", data_parallel_size=2,
                                        max_num_batched_tokens=16)
    try:
        counts = _count_prompt_positions(engine)
        engine.replicas.replica_config.drain_timeout_s = 0.0
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=2)
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), {"prompt_token_ids": prompt}, params, replica=1)
        finished = {}
        while not engine.replicas.replicas[1].core.scheduler.requests["1"].num_output_tokens:
            finished.update((o.request_id, o) for o in engine.step() if o.finished)
        assert engine.replicas.replicas[1].core.scheduler.requests["0"].prompt_logprobs_next < len(prompts[0])
        engine.set_num_replicas(1)
        for _ in range(2000):
            if len(finished) == 2:
                break
            finished.update((o.request_id, o) for o in engine.step() if o.finished)
        assert engine.replicas.replicas[1].events.migrations == 2
        for i, prompt in enumerate(prompts):
            _assert_matches_hf(hf, prompt, finished[str(i)].prompt_logprobs, 2)
            assert counts[str(i)] == len(prompt) - 1
    finally:
        engine.shutdown()


# ---- parallel layouts (mp) -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parallel_checkpoint(tmp_path_factory):
    config, bias_std = PARALLEL_MODELS["llama-kv2"]()
    path = save_tiny_model(config, tmp_path_factory.mktemp("prompt_lp_par"), bias_std=bias_std)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), config.vocab_size


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)],
                         ids=["tp2", "pp2"])
def test_parallel_layouts_match_hf(parallel_checkpoint, layout):
    path, hf, vocab = parallel_checkpoint
    prompts = _rand_prompts(vocab, (37, 9, 24), seed=13)
    prompts.append(prompts[0][:32] + [3, 4])  # a shared prefix
    with LLM(model=path, skip_tokenizer_init=True, kv_cache_memory=1 << 22, distributed_executor_backend="mp",
             max_num_batched_tokens=16, **layout) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=4), use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        _assert_matches_hf(hf, prompt, out.prompt_logprobs, 4)


# ---- the completions endpoint ----------------------------------------------------------------------------
KEY = "sk-prompt-logprobs"


@pytest.fixture(scope="module")
def served(tiny_llama_with_tokenizer):
    server = ServerProcess("--model", tiny_llama_with_tokenizer, "--api-key", KEY, "--max-model-len", "256",
                           "--kv-cache-memory", str(1 << 22))
    yield server, os.path.basename(tiny_llama_with_tokenizer), tiny_llama_with_tokenizer
    server.stop()


def test_completions_echo_logprobs_match_hf(served):
    server, model, path = served
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = tokenizer(prompt).input_ids
    ref = _hf_logprobs(hf, ids)
    hf.generation_config.eos_token_id = None
    greedy = hf.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)[0, len(ids):].tolist()
    full_ref = _hf_logprobs(hf, ids + greedy)

    for max_tokens in (0, 3):
        reply = client.completions.create(model=model, prompt=prompt, echo=True, logprobs=2, max_tokens=max_tokens,
                                          temperature=0)
        choice, lp = reply.choices[0], reply.choices[0].logprobs
        completion = tokenizer.decode(greedy) if max_tokens else ""
        assert choice.text == prompt + completion
        assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == max_tokens
        assert len(lp.tokens) == len(ids) + max_tokens
        assert lp.tokens[:len(ids)] == [tokenizer.decode([t]) for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for j in range(1, len(ids)):
            assert abs(lp.token_logprobs[j] - ref[j - 1, ids[j]].item()) <= ATOL, f"prompt token {j}"
            top = ref[j - 1].topk(2)
            assert set(lp.top_logprobs[j]) == {tokenizer.decode([t]) for t in top.indices.tolist()}
            assert abs(max(lp.top_logprobs[j].values()) - top.values[0].item()) <= ATOL
        for i, token in enumerate(greedy[:max_tokens]):
            assert abs(lp.token_logprobs[len(ids) + i] - full_ref[len(ids) + i - 1, token].item()) <= ATOL
        # Offsets count characters of the returned text, prompt first.
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        assert "".join(lp.tokens) == choice.text
        assert choice.finish_reason == "length"

    # Streamed, the first chunk carries the echoed prompt and its logprobs.
    chunks = list(client.completions.create(model=model, prompt=prompt, echo=True, logprobs=1, max_tokens=0,
                                            temperature=0, stream=True))
    first = chunks[0].choices[0]
    assert first.text == prompt and len(first.logprobs.tokens) == len(ids)
    assert abs(first.logprobs.token_logprobs[-1] - ref[-2, ids[-1]].item()) <= ATOL
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt=prompt, max_tokens=0)


# ---- lm-eval-harness against the server ------------------------------------------------------------------
MC_DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "a small dog"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["four", "seven"], "answer": 0},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Fahrenheit", "Kelvin", "nothing"],
     "answer": 0},
]


def test_lm_eval_loglikelihoods_match_hf(served, tmp_path, monkeypatch):
    """lm-eval-harness's ``local-completions`` model scores a multiple-choice task defined in local files
    through ``dist-infer serve`` (``echo`` + ``logprobs`` + ``max_tokens=1``, prompts as token ids); every
    choice's loglikelihood equals the sum of HF's continuation-token logprobs."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    server, model, path = served
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    results = lm_eval.simple_evaluate(
        model="local-completions", tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
        model_args={"model": model, "base_url": f"{server.base_url}/v1/completions", "tokenizer": path,
                    "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1},
        batch_size=2, log_samples=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    samples = sorted(results["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(MC_DOCS)
    correct = []
    for doc, sample in zip(MC_DOCS, samples):
        assert len(sample["resps"]) == len(doc["choices"])
        scores = []
        for choice, resp in zip(doc["choices"], sample["resps"]):
            # lm-eval's pair encoding: whole = tokens(context + " " + choice); the continuation is what follows
            # the context's own tokens.
            context_ids = tokenizer(doc["question"], add_special_tokens=False).input_ids
            whole = tokenizer(doc["question"] + " " + choice, add_special_tokens=False).input_ids
            ref = _hf_logprobs(hf, whole)
            expected = sum(ref[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))
            loglikelihood, _ = resp[0]
            assert abs(loglikelihood - expected) <= ATOL * (len(whole) - len(context_ids)), (doc, choice)
            scores.append(expected)
        correct.append(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    # The accuracy lm-eval reports is the one HF's own loglikelihoods give.
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
