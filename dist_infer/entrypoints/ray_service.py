"""A Ray-native handle: an engine in a detached, named Ray actor that any driver or job of the cluster reaches.

    # one driver (or `dist-infer serve --name smol`, or LLM(..., name="smol")):
    from dist_infer.entrypoints.ray_service import start_service
    start_service("smol", tensor_parallel_size=1)
    # any other driver or Ray job on the cluster, no HTTP:
    import dist_infer
    handle = dist_infer.get_handle("smol")
    outputs = handle.generate(["The capital of France is"], SamplingParams(max_tokens=8))
    for piece in handle.stream("Tell me a story", SamplingParams(max_tokens=64)):
        print(piece, end="")

The actor outlives the driver that created it (``lifetime="detached"``) until ``handle.shutdown()``. It
hosts an ``AsyncLLMEngine``; its workers are whatever the engine arguments ask for (in-actor, local
processes, or Ray actors of their own). ``RemoteEngine`` gives the HTTP server the same interface over it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator

from dist_infer.entrypoints.chat_utils import as_conversations, chat_prompt
from dist_infer.entrypoints.prompt_args import per_prompt
from dist_infer.executor import ray_cluster
from dist_infer.outputs import RequestOutput
from dist_infer.sampling_params import RequestOutputKind, SamplingParams

NAMESPACE = "dist-infer"


class LLMService:
    """The actor's body (an async actor: every method runs on its event loop)."""

    def __init__(self, engine_kwargs: dict):
        from dist_infer.engine.async_llm_engine import AsyncLLMEngine

        self.engine = AsyncLLMEngine.from_engine_args(**engine_kwargs)

    async def ready(self) -> bool:
        return True

    async def generate(self, prompts: list, params: list[SamplingParams]) -> list[RequestOutput]:
        async def one(prompt, p):
            final = dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
            async for out in self.engine.generate(prompt, final, uuid.uuid4().hex):
                result = out
            return result

        return list(await asyncio.gather(*(one(prompt, p) for prompt, p in zip(prompts, params))))

    async def chat(self, conversations: list, params: list[SamplingParams]) -> list[RequestOutput]:
        tokenizer = self.engine.tokenizer
        prompts = [chat_prompt(tokenizer, conversation) for conversation in conversations]
        return await self.generate(prompts, params)

    async def stream(self, prompt, params: SamplingParams, request_id: str, priority: int = 0):
        """Yields the request's outputs (as ``params.output_kind`` says) until it finishes."""
        async for out in self.engine.generate(prompt, params, request_id, priority):
            yield out

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def num_waiting(self) -> int:
        return self.engine.num_waiting()

    async def check_ready(self, timeout: float) -> dict:
        return await self.engine.check_ready(timeout)

    async def replica_stats(self) -> list:
        return await self.engine.replica_stats()

    async def set_num_replicas(self, count: int) -> dict[int, str]:
        return await self.engine.set_num_replicas(count)

    async def worker_timings(self) -> list[dict]:
        return await self.engine.worker_timings()

    async def shutdown(self) -> None:
        self.engine.shutdown()

    async def engine_error(self) -> str | None:
        """None while the engine serves, else why not (the error's type: its message may quote a request)."""
        if self.engine.is_running:
            return None
        error = getattr(self.engine, "_error", None)
        return (f"the engine actor's step loop failed with {type(error).__name__}" if error is not None
                else "the engine actor's engine has stopped")


def start_service(name: str, **engine_kwargs) -> LLMHandle:
    """Starts the named engine actor (an error if the name is taken) and waits until its engine is up.

    It lives on the running cluster at ``engine_kwargs["ray_address"]`` or ``$RAY_ADDRESS``; a detached actor
    must outlive this driver, so a private instance would not do."""
    import ray

    ray_cluster.connect(engine_kwargs.get("ray_address"), start_local=False)
    actor_cls = ray.remote(LLMService)
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        pass
    else:
        raise ValueError(f"a dist-infer service named {name!r} already runs on this cluster")
    actor = actor_cls.options(name=name, namespace=NAMESPACE, lifetime="detached", num_cpus=0,
                              max_concurrency=1000).remote(engine_kwargs)
    try:
        ray.get(actor.ready.remote())
    except Exception:
        ray.kill(actor)
        raise
    return LLMHandle(actor, name)


def get_handle(name: str, address: str | None = None) -> LLMHandle:
    """The named engine actor started elsewhere on the Ray cluster at ``address`` or ``$RAY_ADDRESS``."""
    import ray

    ray_cluster.connect(address, start_local=False)
    try:
        return LLMHandle(ray.get_actor(name, namespace=NAMESPACE), name)
    except ValueError:
        raise ValueError(f"no dist-infer service named {name!r} on this Ray cluster") from None


class LLMHandle:
    """Blocking calls on a named engine actor, from any driver."""

    def __init__(self, actor, name: str):
        self.actor, self.name = actor, name

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        import ray

        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = per_prompt(sampling_params, len(prompts), "sampling_params")
        return ray.get(self.actor.generate.remote(prompts, params))

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None
             ) -> list[RequestOutput]:
        import ray

        conversations = as_conversations(messages)
        params = per_prompt(sampling_params, len(conversations), "sampling_params")
        return ray.get(self.actor.chat.remote(conversations, params))

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """The new text as it is generated."""
        import ray

        params = dataclasses.replace(sampling_params or SamplingParams(), output_kind=RequestOutputKind.DELTA)
        request_id = uuid.uuid4().hex
        finished = False
        try:
            for ref in self.actor.stream.options(num_returns="streaming").remote(prompt, params, request_id):
                out = ray.get(ref)
                finished = out.finished
                if out.outputs[0].text:
                    yield out.outputs[0].text
        finally:
            if not finished:
                self.actor.abort.remote(request_id)

    def shutdown(self) -> None:
        """Stops the engine and its workers, and removes the actor."""
        import ray

        try:
            ray.get(self.actor.shutdown.remote(), timeout=60)
        finally:
            ray.kill(self.actor)


class RemoteEngine:
    """What the HTTP server needs from an engine, served by a named engine actor (``serve --name``)."""

    def __init__(self, handle: LLMHandle, engine_config):
        from dist_infer.engine.input_processor import InputProcessor
        from dist_infer.engine.tokenizer import load_tokenizer

        self.handle = handle
        self._waiting, self._fetching = 0, None
        self._error: str | None = None  # why the actor's engine can no longer serve (see is_running)
        self._probing = None
        self.model_config = engine_config.model_config
        self.tokenizer = load_tokenizer(engine_config.model_config)
        self._inputs = InputProcessor(engine_config.model_config, self.tokenizer)

    def check_prompt(self, prompt, sampling_params: SamplingParams):
        return self._inputs.process(prompt, sampling_params)

    def num_waiting(self) -> int:
        """The actor's waiting count as last fetched; never blocks. Called on the server's event loop (at each
        admission), it starts a fetch when none is in flight, so the value lags by at most one round trip
        while requests arrive. The server's own admission count does not depend on it (``admission``)."""
        if self._fetching is None or self._fetching.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on an event loop: nothing can await the answer
                return self._waiting
            self._fetching = loop.create_task(self._fetch_waiting())
        return self._waiting

    async def _fetch_waiting(self) -> None:
        try:
            self._waiting = await self.handle.actor.num_waiting.remote()
        except Exception:  # a dead actor: requests fail on their own, with the error
            pass

    async def generate(self, prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        request_id = request_id or uuid.uuid4().hex
        actor = self.handle.actor
        finished = False
        try:
            async for ref in actor.stream.options(num_returns="streaming").remote(
                    prompt, sampling_params or SamplingParams(), request_id, priority):
                out = await ref
                finished = out.finished
                yield out
        finally:
            if not finished:
                actor.abort.remote(request_id)

    @property
    def is_running(self) -> bool:
        """Whether the actor's engine still serves, as last asked; never blocks (like ``num_waiting``, each call
        starts a question when none is in flight). A dead actor counts as stopped; an actor that does not answer
        yet does not."""
        if self._error is None and (self._probing is None or self._probing.done()):
            try:
                self._probing = asyncio.get_running_loop().create_task(self._probe())
            except RuntimeError:  # not on an event loop
                pass
        return self._error is None

    async def _probe(self) -> None:
        from ray.exceptions import RayActorError

        try:
            self._error = await self.handle.actor.engine_error.remote()
        except RayActorError as e:
            self._error = f"the engine actor is gone ({type(e).__name__})"
        except Exception:  # no answer this time (a busy or unreachable node): asked again next time
            pass

    async def check_ready(self, timeout: float) -> dict:
        return await self.handle.actor.check_ready.remote(timeout)

    async def replica_stats(self) -> list:
        return await self.handle.actor.replica_stats.remote()

    async def set_num_replicas(self, count: int) -> dict[int, str]:
        return await self.handle.actor.set_num_replicas.remote(count)

    async def worker_timings(self) -> list[dict]:
        return await self.handle.actor.worker_timings.remote()

    def shutdown(self) -> None:
        self.handle.shutdown()
