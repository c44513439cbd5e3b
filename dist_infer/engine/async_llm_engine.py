"""The asyncio engine: ``async for out in engine.generate(prompt, params, request_id)``.

The synchronous engine runs in one background thread, stepping while it has work and sleeping otherwise;
event-loop code never blocks on a step. Everything that touches the engine -- adding and aborting requests,
reading statistics, calling the workers -- is a command run by that thread between steps, so nothing races
a step (under torchrun a worker call from another thread would interleave with the step's collectives).
Each step's outputs go back to the awaiting coroutines through ``loop.call_soon_threadsafe``. A caller that
stops iterating (client disconnect, cancellation) aborts its request, which frees its KV blocks. If a step
fails, or the engine shuts down, every waiting caller and every pending command gets the error and the engine
refuses new work.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from dist_infer.config import EngineConfig
from dist_infer.engine.arg_utils import EngineArgs
from dist_infer.engine.llm_engine import LLMEngine
from dist_infer.outputs import RequestFailedError, RequestOutput
from dist_infer.sampling_params import SamplingParams

_CANARY_PRIORITY = -(2**31)
_TICK_S = 0.5  # an idle engine with replicas to build, drain or autoscale steps this often  # readiness probes jump the queue: a busy server is not an unready one


class EngineDeadError(RuntimeError):
    """The engine's step loop has stopped (it failed, or the engine was shut down)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass


@dataclass
class _Command:
    run: Callable[[], object]
    loop: asyncio.AbstractEventLoop | None = None  # with a future: the caller awaits the result
    future: asyncio.Future | None = None

    def settle(self, result=None, error: BaseException | None = None) -> None:
        if self.future is not None:
            try:
                self.loop.call_soon_threadsafe(_settle, self.future, result, error)
            except RuntimeError:  # the caller's loop is closed
                pass


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig):
        self.engine = LLMEngine(config)
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._error: BaseException | None = None
        self._stopping = False
        # Set (under _closing) by the drain once the loop has ended: from then on nobody reads _commands, so a
        # submitter holding this lock either queues before the drain or sees the reason and settles its own.
        self._closing = threading.Lock()
        self._closed_reason: EngineDeadError | None = None
        # Requests handed to the engine thread, and of those the ones it has applied (one writer each).
        self._adds_submitted = 0
        self._adds_applied = 0
        self.engine.wakeup = self._wakeup.set  # a replica rebuilt or given up: step again
        self._thread = threading.Thread(target=self._loop, name="dist-infer-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, **kwargs) -> AsyncLLMEngine:
        return cls(EngineArgs.from_kwargs(**kwargs).create_engine_config())

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        """The served model's settings (``max_model_len``, ``vocab_size``), for the server's checks and replies."""
        return self.engine.config.model_config

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._error is None and not self._stopping

    # ---- caller side (event loop) --------------------------------------------------------------------
    def check_prompt(self, prompt, sampling_params: SamplingParams):
        """Validates and tokenizes a prompt without queueing it (a ValueError names what is wrong)."""
        return self.engine.input_processor.process(prompt, sampling_params)

    def num_waiting(self) -> int:
        """Requests accepted but not yet running (an estimate read from outside the engine thread)."""
        pending = self._adds_submitted - self._adds_applied
        return pending + sum(len(core.scheduler.waiting) for core in self.engine.cores) + len(self.engine.replicas.orphans)

    async def generate(self, prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None,
                       priority: int = 0, replica: int | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs as they are produced (cumulative, delta or final only, as its
        ``output_kind`` says); the last one has ``finished=True``. A malformed request raises here; one the
        engine could not finish (replica failures) raises ``RequestFailedError``."""
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())

        def add() -> None:
            self._adds_applied += 1
            self.engine.add_request(request_id, prompt, sampling_params, priority, replica)
            self._streams[request_id] = stream

        self._adds_submitted += 1
        try:
            await self._call(add)
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise RequestFailedError(request_id, item.error)
                yield item
        finally:
            if not finished:  # the caller went away first
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stops a request and frees its blocks; its stream ends with a finish_reason "abort" output."""
        def run() -> None:
            final = self.engine.abort_request(request_id)
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                for output in final:
                    stream.put(output)

        if self.is_running:
            self._submit(_Command(run))

    async def replica_stats(self) -> list[dict]:
        """Per replica, in index order: ``index``, ``state``, ``stats`` (its scheduler's, None while it has no
        core) and ``events`` (failures, migrations, rebuilds)."""
        def read() -> list[dict]:
            return [{"index": r.index, "state": r.state.value, "events": r.events,
                     "stats": r.core.scheduler.get_stats() if r.core is not None else None}
                    for r in sorted(self.engine.replicas.replicas.values(), key=lambda r: r.index)]

        return await self._call(read)

    async def worker_timings(self, timeout: float = 5.0) -> list[dict]:
        """Each running worker's compute / wait / uptime seconds (see Worker.timing); a worker that does not
        answer within ``timeout`` seconds (hung, or in a long step) is left out rather than waited for: the
        calls start on the engine thread and are waited for here."""
        futures = await self._call(lambda: self.engine.executor.start_rpc("timing"))
        done = await _settled(futures, timeout)
        return [f.result() for f in futures if f in done and f.exception() is None]

    def replica_states(self) -> dict[int, str]:
        """Each replica's state (read from outside the engine thread: a snapshot)."""
        return dict(self.engine.replicas.states())

    async def set_num_replicas(self, count: int) -> dict[int, str]:
        """Runs ``count`` replicas from now on (see ``LLMEngine.set_num_replicas``); the states after the change."""
        def run() -> dict[int, str]:
            self.engine.set_num_replicas(count)
            return self.engine.replica_states()

        return await self._call(run)

    async def check_ready(self, timeout: float) -> dict:
        """Every serving replica's workers answer a ping, and a one-token request goes through each of its
        stages, within ``timeout`` seconds. Returns ``{"status": "ready" | "degraded", "replicas": {index:
        state}}`` ("degraded": some replica is failed, rebuilding, starting or not answering while others
        serve); raises, naming what failed, when no replica can serve. The pings start on the engine thread
        and are waited for here, so a hung worker stalls neither the engine nor the other replicas; one that
        failed fails its replica (its requests move, it is rebuilt), one that stays silent fails it after
        the step timeout, as any health check does (``engine.health``)."""
        deadline = _now() + timeout
        serving = self._serving()
        if not serving:
            raise RuntimeError(f"no replica is serving (replicas: {_describe(self.replica_states())})")
        probes = await self._call(lambda: {d: self.engine.replicas.probe(d) for d in serving})

        async def check(replica: int, pings: list) -> None:
            done = await _settled(pings, max(0.0, deadline - _now()))
            errors = [f.exception() for f in done if f.exception() is not None]
            if errors:
                self._wakeup.set()  # the engine thread fails the replica now (engine.health)
                raise errors[0]
            if len(done) < len(pings):
                raise TimeoutError(f"replica {replica}: a worker did not answer a ping within {timeout:.0f}s")
            await self._canary(replica)

        tasks = {d: asyncio.ensure_future(check(d, pings)) for d, pings in probes.items()}
        done, pending = await asyncio.wait(tasks.values(), timeout=max(0.0, deadline - _now()))
        for task in pending:
            task.cancel()
        passed = [d for d, task in tasks.items() if task in done and task.exception() is None]
        if not passed:
            why = "; ".join(f"replica {d}: " + (repr(task.exception()) if task in done else "no answer")
                            for d, task in tasks.items())
            raise RuntimeError(f"no replica answered and finished a one-token request within {timeout:.0f}s "
                               f"(replicas: {_describe(self.replica_states())}; {why})")
        states = self.replica_states()
        degraded = len(passed) < len(serving) or any(state not in ("serving", "stopped") for state in states.values())
        return {"status": "degraded" if degraded else "ready", "replicas": states}

    async def _canary(self, replica: int) -> None:
        params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0)
        async for _ in self.generate({"prompt_token_ids": [0]}, params, f"ready-{uuid.uuid4().hex}",
                                     priority=_CANARY_PRIORITY, replica=replica):
            pass

    def _serving(self) -> list[int]:
        return [d for d, state in self.replica_states().items() if state == "serving"]

    def get_stats(self):
        return self.engine.get_stats()

    def shutdown(self) -> None:
        """Stops the step loop (failing whatever still waits), then the workers."""
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout=30)
        # A thread still inside a step (a hung worker) is released by stopping the workers under it.
        self.engine.shutdown()
        self._thread.join(timeout=30)

    async def _call(self, fn: Callable[[], object]):
        """Runs ``fn`` on the engine thread between steps; its result or exception comes back here."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        command = _Command(fn, loop, loop.create_future())
        self._submit(command)
        return await command.future

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._error}") from self._error
        if self._stopping or not self._thread.is_alive():
            raise EngineDeadError("the engine is shut down")

    def _submit(self, command: _Command) -> None:
        """Queues ``command`` for the engine thread, or, once that thread has drained its queue for the last
        time, settles it here with the reason (the liveness check and the put are one step under _closing)."""
        with self._closing:
            reason = self._closed_reason
            if reason is None:
                self._commands.put(command)
        if reason is not None:
            command.settle(error=reason)
            return
        self._wakeup.set()

    # ---- engine side (background thread) -------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._run_commands()
                if not self.engine.has_unfinished_requests():
                    ticks = self.engine.needs_ticks()
                    self._wakeup.wait(_TICK_S if ticks else None)
                    self._wakeup.clear()
                    if not ticks:
                        continue
                for output in self.engine.step():
                    stream = self._streams.get(output.request_id)
                    if stream is None:
                        continue
                    if output.finished:
                        del self._streams[output.request_id]
                    stream.put(output)
        except BaseException as e:  # a failed step: fail every caller rather than leave them waiting
            self._error = e
        finally:
            reason = (EngineDeadError(f"engine step failed: {self._error!r}") if self._error is not None
                      else EngineDeadError("the engine was shut down"))
            self._fail_all(reason)

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result = command.run()
            except Exception as e:  # reported to the caller that asked (bad input, a worker error)
                command.settle(error=e)
            else:
                command.settle(result)

    def _fail_all(self, error: EngineDeadError) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(error)
        with self._closing:  # the last drain: later submitters settle their own commands (see _submit)
            self._closed_reason = error
            pending = []
            while True:
                try:
                    pending.append(self._commands.get_nowait())
                except queue.Empty:
                    break
        for command in pending:  # commands that will never run now
            command.settle(error=error)


def _describe(states: dict[int, str]) -> str:
    return ", ".join(f"{d}: {state}" for d, state in sorted(states.items())) or "none"


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _now() -> float:
    return asyncio.get_running_loop().time()


async def _settled(futures: list, timeout: float) -> set:
    """Waits up to ``timeout`` seconds for ``futures`` (concurrent ones, settled on other threads); the done
    ones. Those still running are left running: nothing here cancels a worker's call."""
    if not futures:
        return set()
    wrapped = [asyncio.wrap_future(f) for f in futures]
    for w in wrapped:  # their errors are read from ``futures``; a wrapper left unread would log a traceback
        w.add_done_callback(_retrieve)
    await asyncio.wait(wrapped, timeout=timeout)
    return {f for f in futures if f.done()}


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
