"""The asyncio engine: streaming order, deltas, aborts on disconnect, errors reach the caller."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch

from conftest import save_tiny_model, tiny_llama_config
from dist_infer import AsyncLLMEngine, LLM, RequestOutputKind, SamplingParams
from dist_infer.engine.async_llm_engine import EngineDeadError


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_model(tiny_llama_config(max_position_embeddings=512), tmp_path_factory.mktemp("tiny_async"))


@pytest.fixture(scope="module")
def engine(tiny_path):
    engine = AsyncLLMEngine.from_engine_args(model=tiny_path, skip_tokenizer_init=True, kv_cache_memory=1 << 22,
                                             max_num_batched_tokens=16, long_prefill_token_threshold=8)
    yield engine
    engine.shutdown()


def _prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"prompt_token_ids": torch.randint(0, 128, (n,), generator=g).tolist()}


async def _collect(engine, prompt, params, request_id, events=None):
    outputs = []
    async for out in engine.generate(prompt, params, request_id):
        outputs.append(out)
        if events is not None:
            events.append((request_id, len(out.outputs[0].token_ids)))
    return outputs


def test_short_request_streams_while_a_long_prompt_is_still_in_prefill(engine):
    long_prompt = _prompt(200, seed=1)
    events = []

    async def main():
        long_task = asyncio.create_task(_collect(engine, long_prompt, SamplingParams(temperature=0, max_tokens=3),
                                                 "long", events))
        await asyncio.sleep(0)  # the task runs up to its first await: the long request is submitted first
        short_first = None
        async for out in engine.generate(_prompt(4, seed=2), SamplingParams(temperature=0, max_tokens=3), "short"):
            if short_first is None:
                # Read right after the short request's first token arrived: the long prompt is still being
                # computed in chunks of at most 8 tokens per step.
                short_first = engine.engine.cores[0].scheduler.requests["long"].num_computed_tokens
                events.append(("short", 1))
        await long_task
        return short_first

    computed_when_short_streamed = asyncio.run(main())
    assert computed_when_short_streamed < 200
    first_long = next(i for i, (rid, _) in enumerate(events) if rid == "long")
    first_short = next(i for i, (rid, _) in enumerate(events) if rid == "short")
    assert first_short < first_long


def test_delta_outputs_add_up_to_the_cumulative_result(engine, tiny_path):
    prompt = _prompt(30, seed=3)

    async def main():
        delta = await _collect(engine, prompt, SamplingParams(temperature=0, max_tokens=12,
                                                              output_kind=RequestOutputKind.DELTA), "delta")
        final = await _collect(engine, prompt, SamplingParams(temperature=0, max_tokens=12,
                                                              output_kind=RequestOutputKind.FINAL_ONLY), "final")
        return delta, final

    delta, final = asyncio.run(main())
    assert len(final) == 1 and final[0].finished
    assert [t for out in delta for t in out.outputs[0].token_ids] == final[0].outputs[0].token_ids
    assert all(len(out.outputs[0].token_ids) == 1 for out in delta)
    reference = LLM(model=tiny_path, skip_tokenizer_init=True, kv_cache_memory=1 << 22).generate(
        prompt, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert final[0].outputs[0].token_ids == reference[0].outputs[0].token_ids
    metrics = final[0].metrics
    assert metrics.time_to_first_token > 0 and len(metrics.inter_token_latencies) == 11


def test_concurrent_requests_match_one_at_a_time(engine):
    prompts = [_prompt(n, seed=n) for n in (3, 50, 17, 90, 8)]
    params = SamplingParams(temperature=0, max_tokens=10)

    async def main():
        tasks = [_collect(engine, p, params, f"c{i}") for i, p in enumerate(prompts)]
        together = await asyncio.gather(*tasks)
        alone = [await _collect(engine, p, params, f"a{i}") for i, p in enumerate(prompts)]
        return together, alone

    together, alone = asyncio.run(main())
    assert [o[-1].outputs[0].token_ids for o in together] == [o[-1].outputs[0].token_ids for o in alone]


def _all_blocks_free(engine) -> bool:
    stats = engine.get_stats()
    return stats.kv_blocks_free == stats.kv_blocks_total and stats.num_running == 0 and stats.num_waiting == 0


def test_disconnect_and_cancel_abort_the_request_and_free_its_blocks(engine):
    async def main():
        gen = engine.generate(_prompt(40, seed=5), SamplingParams(temperature=0, max_tokens=400), "walkaway")
        async with contextlib.aclosing(gen):
            async for out in gen:
                if len(out.outputs[0].token_ids) >= 2:
                    break  # the client goes away mid-stream

        async def consume():
            async for _ in engine.generate(_prompt(40, seed=6), SamplingParams(temperature=0, max_tokens=400),
                                           "cancelled"):
                pass

        task = asyncio.create_task(consume())
        while engine.get_stats().num_running == 0:
            await asyncio.sleep(0)  # let the request reach the engine
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Commands run in order, so once a later request is done both aborts have been applied.
        await _collect(engine, _prompt(3), SamplingParams(max_tokens=1), "barrier")

    asyncio.run(main())
    assert _all_blocks_free(engine)


def test_explicit_abort_ends_the_stream(engine):
    async def main():
        outputs = []
        async for out in engine.generate(_prompt(10, seed=7), SamplingParams(temperature=0, max_tokens=400), "ab"):
            outputs.append(out)
            if len(outputs) == 2:
                engine.abort("ab")
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
    assert len(outputs[-1].outputs[0].token_ids) < 400


def test_bad_request_raises_at_the_caller_and_the_engine_goes_on(engine):
    async def main():
        with pytest.raises(ValueError, match="prompt is empty"):
            await _collect(engine, {"prompt_token_ids": []}, SamplingParams(), "bad")
        return await _collect(engine, _prompt(5), SamplingParams(max_tokens=2), "good")

    assert asyncio.run(main())[-1].finished


class _ShutDownMidCall(AsyncLLMEngine):
    """Places the race: the engine shuts down (its loop drains the commands and exits) right after a caller's
    liveness check passed and before its command is queued."""

    armed = False

    def _check_alive(self) -> None:
        super()._check_alive()
        if self.armed:
            self.armed = False
            self.shutdown()  # returns once the loop thread has run its last drain and exited
            assert not self._thread.is_alive()


def test_a_command_queued_after_the_last_drain_is_settled_not_lost(tiny_path):
    engine = _ShutDownMidCall.from_engine_args(model=tiny_path, skip_tokenizer_init=True, kv_cache_memory=1 << 22)
    engine.armed = True

    async def main():
        # Before the fix the command sat in a queue nobody read again and the caller waited forever.
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(engine.replica_stats(), timeout=10)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
