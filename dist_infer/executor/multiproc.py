"""Workers as local child processes (``distributed_executor_backend="mp"``).

Each worker is a process with a pipe to the coordinator. A sender thread writes calls to the pipe (so the
coordinator never blocks on a busy worker) and a reader thread resolves the calls' futures in order as
replies arrive. A worker that dies fails its pending calls at once with its exit code; a worker whose
coordinator process dies (even by SIGKILL, even while the worker is stuck in a step) is killed by the kernel
(PR_SET_PDEATHSIG), so no process outlives the coordinator.

Workers are forked from a fork server (on Linux) that imported torch and the worker code once, so a worker
(and a replica rebuilt after a failure) starts in a fraction of a second instead of paying the imports every
time; elsewhere they are spawned. Either way a worker starts with no state but its arguments and the
coordinator's environment of the moment (which a fork server alone would not pass on).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import queue
import signal
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.reduction import ForkingPickler

from dist_infer.config import EngineConfig
from dist_infer.distributed.utils import LocalRendezvous
from dist_infer.executor.base import format_failure, run_method
from dist_infer.executor.distributed import DistributedExecutor, WorkerHandle

_SHUTDOWN = None


# Imported once by the fork server: torch, the worker, and the configuration code every checkpoint's config
# needs when it is unpickled (most of what a new worker would otherwise import).
_PRELOAD = ["dist_infer.executor.fork_server", "dist_infer.worker.worker", "transformers.models.llama.configuration_llama"]
_context = None


def _mp_context():
    global _context
    if _context is None:
        if "forkserver" in mp.get_all_start_methods():
            _context = mp.get_context("forkserver")
            _context.set_forkserver_preload(_PRELOAD)
        else:
            _context = mp.get_context("spawn")
    return _context


def _die_with_parent(coordinator_pid: int) -> None:
    """SIGKILL this worker when the thread that started it exits. The kernel ties PR_SET_PDEATHSIG to the
    creating *thread*. A forked worker's parent is the fork server, which exits when the coordinator does; a
    spawned worker's is the coordinator's spawner thread (``_start_process``), which lives as long as the
    coordinator process. Either way the signal means "the coordinator process is gone"."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    # A forked worker inherits the coordinator's end of the pipe whose closing tells the fork server that the
    # coordinator is gone; held open here, it would keep the fork server (and so this worker) alive forever.
    from multiprocessing import forkserver

    alive_fd = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_alive_fd", None)
    if alive_fd is not None and os.getppid() != coordinator_pid:
        try:
            os.close(alive_fd)
        except OSError:
            pass
    try:  # the coordinator died before the request took effect
        os.kill(coordinator_pid, 0)
    except ProcessLookupError:
        os._exit(1)
    if os.getppid() == 1:
        os._exit(1)


def _worker_main(conn, config: EngineConfig, rank: int, init_method: str, local_rank: int, num_threads: int,
                 parent_pid: int, local_world_size: int, world_ranks: list[int], environ: dict) -> None:
    _die_with_parent(parent_pid)
    os.environ.clear()
    os.environ.update(environ)
    # Ctrl+C in a terminal, or systemd signalling the whole unit, reaches the workers too: they leave the
    # coordinator to drain its requests and stop them (and die with it in any case).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from dist_infer.distributed.parallel_state import destroy_distributed
    from dist_infer.worker.worker import Worker

    try:
        worker = Worker(config, rank, init_method, local_rank, num_threads, local_world_size=local_world_size,
                        world_ranks=world_ranks)
    except BaseException as e:
        conn.send(("error", format_failure(e)))
        return
    conn.send(("ok", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the coordinator is gone
            break
        if message is _SHUTDOWN:
            break
        method, args, kwargs = message
        try:
            reply = ("ok", run_method(worker, method, args, kwargs))
        except BaseException as e:
            reply = ("error", format_failure(e))
        conn.send(reply)
    destroy_distributed()


_spawner_lock = threading.Lock()
_spawner: tuple[int, ThreadPoolExecutor] | None = None  # (the pid that owns it, its one thread)


def _start_process(process) -> None:
    """Starts ``process`` from this process's one spawner thread and waits until it is started.

    The caller's thread may be short-lived (an engine built in a thread pool): had it started the worker, the
    worker's PR_SET_PDEATHSIG would kill it when that thread exits. The spawner thread only ends with the
    process, so workers die with the coordinator process and with nothing else."""
    global _spawner
    with _spawner_lock:
        if _spawner is None or _spawner[0] != os.getpid():  # none yet, or inherited through a fork
            _spawner = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="dist-infer-spawner"))
        spawner = _spawner[1]
    spawner.submit(process.start).result()  # re-raises what start() raised


class ProcessWorker(WorkerHandle):
    def __init__(self, ctx, config: EngineConfig, rank: int, coords, init_method: str, local_rank: int,
                 num_threads: int, local_world_size: int, world_ranks: list[int]):
        super().__init__(rank, coords)
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, name=f"dist-infer-worker-{rank}", daemon=True,
                                   args=(child, config, rank, init_method, local_rank, num_threads, os.getpid(),
                                         local_world_size, world_ranks, dict(os.environ)))
        _start_process(self.process)
        child.close()
        self._lock = threading.Lock()
        self._pending: deque[tuple[Future, str]] = deque()
        self._dead: str | None = None
        self.ready: Future = Future()  # the first reply: the worker is built (or failed to load)
        self._pending.append((self.ready, "load"))
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._send_loop, name=f"dist-infer-send-{rank}", daemon=True).start()
        threading.Thread(target=self._recv_loop, name=f"dist-infer-recv-{rank}", daemon=True).start()

    def call(self, method, args=(), kwargs=None) -> Future:
        future: Future = Future()
        what = method if isinstance(method, str) else getattr(method, "__name__", "rpc")
        try:  # pickled here, so a call that cannot travel fails alone instead of stalling the pipe
            message = bytes(ForkingPickler.dumps((method, args, kwargs or {})))
        except Exception as e:
            future.set_exception(self.error(what, f"the call cannot be sent to a worker process: {e}"))
            return future
        with self._lock:
            if self._dead is not None:
                future.set_exception(self.error(what, self._dead))
                return future
            self._pending.append((future, what))
            self._outbox.put(message)
        return future

    def _send_loop(self) -> None:
        while True:
            message = self._outbox.get()
            try:
                if message is _SHUTDOWN:
                    self.conn.send(_SHUTDOWN)
                    return
                self.conn.send_bytes(message)
            except (OSError, ValueError):
                return

    def _recv_loop(self) -> None:
        while True:
            try:
                status, payload = self.conn.recv()
            except (EOFError, OSError):
                self.process.join(timeout=2)
                self._fail_all(f"the worker process exited (exit code {self.process.exitcode})")
                return
            with self._lock:
                future, what = self._pending.popleft()
            if status == "ok":
                future.set_result(payload)
            else:
                future.set_exception(self.error(what, payload))

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            self._dead = reason
            pending, self._pending = list(self._pending), deque()
        for future, what in pending:
            if not future.done():
                future.set_exception(self.error(what, reason))

    def shutdown(self, graceful: bool = True) -> None:
        if graceful and self.process.is_alive():
            self._outbox.put(_SHUTDOWN)
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self.conn.close()


class MultiprocExecutor(DistributedExecutor):
    """The workers of one data-parallel replica (``None``: of every replica) as child processes of this one,
    with a rendezvous of their own."""

    def __init__(self, config: EngineConfig, replica: int | None = 0, workers_on_host: int | None = None):
        """``workers_on_host``: how many workers this host runs at most over every replica (default: the
        layout's world); they share its cores and its CPU KV-cache budget."""
        super().__init__(config, replica)
        ctx = _mp_context()
        workers_on_host = workers_on_host or self.layout.world_size
        self.rendezvous = LocalRendezvous()
        init_method = self.rendezvous.init_method
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // workers_on_host)  # workers share this machine's cores without oversubscribing them
        self.handles = {rank: ProcessWorker(ctx, config, rank, self.layout.coords(rank), init_method, rank,
                                            threads, workers_on_host, self.ranks)
                        for rank in self.ranks}
        try:
            self.wait_loaded([self.handles[r].ready for r in self.ranks])
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self, graceful: bool = True) -> None:
        super().shutdown(graceful)
        self.rendezvous.close()
