"""Sliding-window layers keep only their window's blocks (``kv_cache_groups``): the manager gives back the
sliding group's blocks that every window has left while the full-attention group grows with the context, prefix
hits need the window's blocks, preemption frees both groups; end to end, a model alternating sliding and global
layers matches Hugging Face over a context many windows long, in one process and under mp with tp=2 x pp=2."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, Qwen2Config

from conftest import no_special_tokens, save_tiny_model
from dist_infer import LLM, SamplingParams
from dist_infer.config import SchedulerConfig
from dist_infer.engine.kv_cache_manager import KVCacheManager
from dist_infer.engine.messages import ModelRunnerOutput
from dist_infer.engine.request import Request
from dist_infer.engine.scheduler import Scheduler
from dist_infer.kv_cache_groups import KVCacheGroups, cdiv

WINDOW, BLOCK = 8, 4
GROUPS = KVCacheGroups((None, WINDOW))


def _held(kv: KVCacheManager, request_id: str, group: int) -> int:
    """Real (non-null) blocks the request holds in ``group``."""
    return sum(b is not kv.pools[group].null_block for b in kv.block_tables[request_id][group])


def _request(rid: str, prompt: list[int], max_tokens: int) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens), frozenset(), max_tokens)


def _run(sched: Scheduler, on_step=None, after_step=None, limit: int = 1000) -> None:
    """Steps the scheduler with a fake model (token 7 for every request that caught up) until all finish;
    ``on_step(output)`` sees each step once scheduled, ``after_step()`` once it returned."""
    for _ in range(limit):
        if not sched.num_unfinished:
            return
        out = sched.schedule()
        if on_step is not None:
            on_step(out)
        result = ModelRunnerOutput()
        for rid, n in out.num_scheduled_tokens.items():
            req = sched.requests[rid]
            if req.num_computed_tokens + n == req.num_tokens:
                result.sampled_token_ids[rid] = 7
        sched.update_from_output(out, result)
        if after_step is not None:
            after_step()
    raise AssertionError("requests did not finish")


# ---- the manager and the scheduler (no model) ----------------------------------------------------------
def test_long_request_holds_a_window_of_sliding_blocks_while_full_group_grows():
    kv = KVCacheManager([40, 10], BLOCK, groups=GROUPS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=8, long_prefill_token_threshold=8), kv,
                      max_model_len=160)
    sched.add_request(_request("a", list(range(1, 21)), max_tokens=120))
    bound = kv.max_blocks_held(140, 8)[1]
    assert bound == cdiv(WINDOW + 8, BLOCK) + 1 < kv.blocks_for(140)
    seen = []

    def check(out):
        if "a" not in kv.block_tables:
            return
        held, stats = _held(kv, "a", 1), sched.get_stats()
        assert held <= bound and stats.kv_group_blocks_used == (len(kv.block_tables["a"][0]), held)
        # Every block the window left is the null block now; the pool has the others back.
        first = GROUPS.first_kept_block(1, sched.requests["a"].num_computed_tokens, BLOCK)
        assert all(b is kv.pools[1].null_block for b in kv.block_tables["a"][1][:first])
        assert kv.pools[1].num_free_blocks == 10 - held
        seen.append((len(kv.block_tables["a"][0]), out.cached_requests[0].num_null if out.cached_requests else ()))

    def between_steps():  # a returned step gives back what its request's window left at once
        if "a" in kv.block_tables:
            assert _held(kv, "a", 1) <= cdiv(WINDOW, BLOCK) + 1

    _run(sched, check, between_steps)
    assert seen[-1][0] == kv.blocks_for(139)  # the full group held the whole context
    assert seen[-1][1] == (0, GROUPS.first_kept_block(1, 139, BLOCK))  # and the workers were told of the nulls
    assert kv.group_free_blocks == (40, 10)


def test_prefix_hit_needs_the_window_blocks_of_the_sliding_group():
    kv = KVCacheManager([20, 20], BLOCK, groups=GROUPS)
    prompt = list(range(1, 25))  # 6 full blocks
    kv.allocate_slots("a", prompt, 0, 24)
    sliding = kv.block_ids("a", 1)
    kv.allocate_slots("a", prompt + [99], 24, 1)  # a decodes: its sliding blocks 0..3 leave the window
    assert kv.num_null("a") == (0, 4) and kv.block_ids("a", 1)[:4] == [0, 0, 0, 0]
    # A hit keeps the full group's blocks 0..5 and only the sliding blocks of the window before position 24.
    hits, n = kv.get_computed_blocks("b", prompt + [5])
    assert n == 24 and [b.block_id for b in hits[0]] == kv.block_ids("a")[:6]
    assert [b.block_id for b in hits[1]] == [0, 0, 0, 0] + kv.block_ids("a", 1)[4:6]
    assert kv.allocate_slots("b", prompt + [5], 24, 1, hits) is not None
    assert [b.ref_cnt for b in kv.block_tables["b"][1][4:6]] == [2, 2] and kv.num_null("b") == (0, 4)
    kv.free("b")
    # The sliding group lost the last block of the prefix: the hit shrinks to the longest prefix whose window is
    # still cached (blocks given back keep their contents and keys until they are taken).
    kv.pools[1].uncache(kv.block_tables["a"][1][5])
    hits, n = kv.get_computed_blocks("c", prompt + [5])
    assert n == 20 and len(hits[0]) == 5 and [b.block_id for b in hits[1][3:]] == sliding[3:5]
    assert hits[1][2] is kv.pools[1].null_block
    # A miss in the full group is a miss, whatever the sliding group holds.
    kv.pools[0].uncache(kv.block_tables["a"][0][0])
    assert kv.get_computed_blocks("d", prompt + [5]) == ([[], []], 0)


def test_preemption_and_finishing_free_both_groups():
    kv = KVCacheManager([12, 8], BLOCK, groups=GROUPS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=12), kv, max_model_len=64)
    for i in range(3):
        sched.add_request(_request(str(i), [i + 1] * 10, max_tokens=30))
    _run(sched)
    stats = sched.get_stats()
    assert stats.num_preemptions > 0  # 3 x 40 tokens cannot share 12 full blocks
    assert kv.group_free_blocks == (12, 8) and stats.kv_group_blocks_used == (0, 0)
    assert all(b.ref_cnt == 0 for pool in kv.pools for b in pool.blocks)


def test_groups_from_config():
    mixed = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=16,
                        layer_types=["sliding_attention", "full_attention"] * 2)
    assert KVCacheGroups.from_hf_config(mixed).windows == (None, 16)
    assert KVCacheGroups.from_hf_config(Qwen2Config(num_hidden_layers=2)).windows == (None,)
    assert KVCacheGroups().group_of(24) == 0  # one kind of layer: one group, as before


# ---- end to end ----------------------------------------------------------------------------------------
E2E_WINDOW, E2E_BLOCK, PROMPT, NEW = 16, 4, 40, 200
# One entry per model family with sliding and global layers; a Gemma 2/3 config joins with one line.
MODELS = {
    "qwen2-alternating": lambda: Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, use_sliding_window=True, sliding_window=E2E_WINDOW,
        layer_types=["sliding_attention", "full_attention"] * 2, initializer_range=0.3, **no_special_tokens()),
    # Gemma 2: local and global layers alternating, scores and logits soft-capped.
    "gemma2": lambda: Gemma2Config(**GEMMA, attn_logit_softcapping=4.0, final_logit_softcapping=8.0,
                                   layer_types=["sliding_attention", "full_attention"] * 2),
    # Gemma 3: three local layers to a global one, each kind with its own RoPE.
    "gemma3": lambda: Gemma3TextConfig(
        **GEMMA, layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
}
GEMMA = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12, sliding_window=E2E_WINDOW,
             max_position_embeddings=256, initializer_range=0.3, tie_word_embeddings=True, **no_special_tokens())
ENGINE = dict(skip_tokenizer_init=True, block_size=E2E_BLOCK, max_model_len=PROMPT + NEW, max_num_seqs=4,
              max_num_batched_tokens=16, long_prefill_token_threshold=12, enable_prefix_caching=True)


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, tmp_path_factory):
    config = MODELS[request.param]()
    path = save_tiny_model(config, tmp_path_factory.mktemp(request.param))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, config.vocab_size, (PROMPT,), generator=g).tolist()
    # The second shares 32 tokens with the first and arrives once the first has left them behind its window.
    items = [(first, NEW, 0), (first[:32] + torch.randint(0, config.vocab_size, (8,), generator=g).tolist(), 24, 6)]
    reference = []
    for prompt, new, _ in items:
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
        reference.append((out.sequences[0, len(prompt):].tolist(),
                          torch.stack([torch.log_softmax(step[0].float(), -1) for step in out.logits])))
    return path, config.vocab_size, items, reference


def _drive(llm, vocab: int, items, after_step=lambda: None):
    """Adds each (prompt, max_tokens, arrival step) at its step and steps until all finish; returns per item the
    tokens and full logprob rows, and the per-group blocks in use after every step."""
    engine, finished, used, step = llm.engine, {}, [], 0
    while len(finished) < len(items):
        for i, (prompt, new, arrival) in enumerate(items):
            if arrival == step:
                engine.add_request(str(i), {"prompt_token_ids": prompt},
                                   SamplingParams(temperature=0, max_tokens=new, logprobs=vocab))
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                finished[int(out.request_id)] = (c.token_ids, torch.tensor(
                    [[entry[t].logprob for t in range(vocab)] for entry in c.logprobs]))
        used.append(engine.get_stats().kv_group_blocks_used)
        after_step()
        step += 1
        assert step < 1000, "requests did not finish"
    return [finished[i] for i in range(len(items))], used


def _assert_matches(results, reference):
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(results, reference):
        assert tokens == ref_tokens
        torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-4, rtol=0)


def test_long_context_matches_hf_with_bounded_sliding_blocks(model):
    path, vocab, items, reference = model
    llm = LLM(model=path, kv_cache_memory=1 << 22, **ENGINE)
    worker_states = llm.engine.executor.executor_of(0).worker.runner.requests
    nulled = []

    def workers_hold_nulls():
        """The worker's sliding table points at the null block exactly where the window has left."""
        for state in worker_states.values():
            first = KVCacheGroups((None, E2E_WINDOW)).first_kept_block(1, state.num_computed_tokens, E2E_BLOCK)
            assert state.block_ids[1][:first] == [0] * first and 0 not in state.block_ids[1][first:]
            nulled.append(first)

    results, used = _drive(llm, vocab, items, workers_hold_nulls)
    assert max(nulled) >= (PROMPT + NEW - E2E_WINDOW) // E2E_BLOCK - 1
    _assert_matches(results, reference)
    stats = llm.engine.get_stats()
    assert stats.prefix_cache_hits > 0 and stats.kv_blocks_free == stats.kv_blocks_total
    # Between steps two requests at most, each within its window; the full group held the whole long context.
    assert max(u[1] for u in used) <= 2 * (cdiv(E2E_WINDOW, E2E_BLOCK) + 1)
    assert max(u[0] for u in used) >= cdiv(PROMPT + NEW - 1, E2E_BLOCK)
    report = llm.engine.executor.collective_rpc("memory_report")[0]
    assert report["kv_group_windows"] == [None, E2E_WINDOW]
    # The sliding group is sized for max_num_seqs windows (the budget rule); the rest went to the full group,
    # which is capped at max_num_seqs sequences of max_model_len.
    groups = KVCacheGroups((None, E2E_WINDOW))
    assert report["kv_group_blocks"] == [ENGINE["max_num_seqs"] * cdiv(PROMPT + NEW, E2E_BLOCK), groups.sliding_blocks(
        1, ENGINE["max_num_seqs"], ENGINE["max_num_batched_tokens"], PROMPT + NEW, E2E_BLOCK)]
    assert report["kv_cache_bytes"] == sum((n + groups.null_blocks(g)) * b for g, (n, b) in enumerate(
        zip(report["kv_group_blocks"], report["kv_group_bytes_per_block"])))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gemma2", "qwen2-alternating"], indirect=True)
def test_tp2_pp2_matches_hf(model, monkeypatch):
    """Also the PyTorch reference path of decode attention (the one-process test runs the CPU kernel), which
    gathers the null block for the given-back entries and masks it."""
    monkeypatch.setenv("DIST_INFER_NATIVE_KERNELS", "0")
    path, vocab, items, reference = model
    with LLM(model=path, kv_cache_memory=1 << 21, distributed_executor_backend="mp", tensor_parallel_size=2,
             pipeline_parallel_size=2, **ENGINE) as llm:
        results, used = _drive(llm, vocab, items)
        _assert_matches(results, reference)
        stats = llm.engine.get_stats()
        assert stats.prefix_cache_hits > 0 and stats.kv_blocks_free == stats.kv_blocks_total
