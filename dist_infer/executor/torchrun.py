"""Processes started by torchrun (``distributed_executor_backend="torchrun"``, vLLM's ``external_launcher``).

SPMD: every process is started by ``torchrun --nproc-per-node N -m dist_infer.launch ...`` and joins the
world through torchrun's rendezvous (``env://``). Rank 0 runs the coordinator -- the engine, its scheduler,
and its own worker -- and the other ranks run ``worker_loop``. Each step rank 0 broadcasts the scheduler
output over the world's CPU group, every worker of the addressed replica runs it, and the replica's sampling
rank sends the sampled tokens back to rank 0. Steps run one at a time (so data-parallel replicas take turns
rather than overlap; use ``mp`` or ``ray`` for concurrent replicas); a failing rank ends the job through
torchrun, which stops every process of it.
"""

from __future__ import annotations

import os
from concurrent.futures import Future

import torch.distributed as dist

from dist_infer.config import EngineConfig
from dist_infer.distributed.layout import layout_of
from dist_infer.distributed.parallel_state import destroy_distributed, get_world_group
from dist_infer.engine.messages import ModelRunnerOutput, SchedulerOutput
from dist_infer.executor.base import Executor, Method, WorkerError, format_failure, run_method
from dist_infer.worker.worker import Worker


def launched_rank() -> int:
    if "RANK" not in os.environ:
        raise RuntimeError("distributed_executor_backend='torchrun' needs a torchrun launch (RANK is not set): "
                           "torchrun --nproc-per-node N -m dist_infer.launch ...")
    return int(os.environ["RANK"])


def _check_world(config: EngineConfig) -> None:
    p = config.parallel_config
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != p.world_size:
        raise ValueError(
            f"torchrun started {world} processes but tensor x pipeline x data parallel sizes need {p.world_size}"
        )


def _broadcast(message) -> object:
    box = [message]
    dist.broadcast_object_list(box, src=0, group=get_world_group().cpu_group)
    return box[0]


def _start_worker(config: EngineConfig, rank: int) -> Worker:
    _check_world(config)
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or None
    # torchrun's LOCAL_WORLD_SIZE workers share this node's RAM, so they split its CPU KV-cache budget.
    return Worker(config, rank, "env://", int(os.environ.get("LOCAL_RANK", "0")), threads,
                  local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


class TorchrunExecutor(Executor):
    def __init__(self, config: EngineConfig):
        super().__init__(config)
        if launched_rank() != 0:
            raise RuntimeError("only rank 0 runs the coordinator; other ranks run dist_infer.launch's worker loop")
        self.worker = _start_worker(config, 0)
        self._closed = False
        self._broken = False  # the ranks are out of step: no orderly shutdown is possible

    def collective_rpc(self, method: Method, args: tuple = (), kwargs: dict | None = None,
                       ranks: list[int] | None = None) -> list:
        _broadcast(("rpc", method, args, kwargs or {}))
        try:
            mine = ("ok", run_method(self.worker, method, args, kwargs or {}))
        except BaseException as e:
            mine = ("error", format_failure(e))
        replies = [None] * self.layout.world_size
        dist.gather_object(mine, replies, dst=0, group=get_world_group().cpu_group)
        what = method if isinstance(method, str) else getattr(method, "__name__", "rpc")
        for rank, (status, payload) in enumerate(replies):
            if status == "error":
                raise WorkerError(rank, self.layout.coords(rank), what, payload)
        results = [payload for _, payload in replies]
        return results if ranks is None else [results[r] for r in ranks]

    def execute_model(self, scheduler_output: SchedulerOutput, replica: int = 0) -> Future[ModelRunnerOutput]:
        _broadcast(("step", replica, scheduler_output))
        result = None
        if replica == 0:
            try:
                result = self.worker.execute_model(scheduler_output)
            except BaseException:
                # The other ranks may sit in this step's collectives: rank 0 must leave, and torchrun then
                # stops the whole job.
                self._broken = True
                raise
        source = self.layout.output_rank(replica)
        if source != 0:
            box = [None]
            dist.recv_object_list(box, src=source, group=get_world_group().cpu_group)
            status, result = box[0]
            if status == "error":
                raise WorkerError(source, self.layout.coords(source), "execute_model", result)
        future: Future = Future()
        future.set_result(result)
        return future

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._broken:
            return  # exiting with the error makes torchrun stop every rank
        _broadcast(("shutdown",))
        destroy_distributed()


def worker_loop(config: EngineConfig) -> None:
    """What every rank but 0 runs: follow rank 0's broadcasts until it says shutdown."""
    rank = launched_rank()
    worker = _start_worker(config, rank)
    layout = layout_of(config)
    my_replica = layout.coords(rank)[0]
    cpu_group = get_world_group().cpu_group
    while True:
        message = _broadcast(None)
        kind = message[0]
        if kind == "shutdown":
            break
        if kind == "rpc":
            _, method, args, kwargs = message
            try:
                reply = ("ok", run_method(worker, method, args, kwargs))
            except BaseException as e:
                reply = ("error", format_failure(e))
            dist.gather_object(reply, None, dst=0, group=cpu_group)
        elif kind == "step":
            _, replica, scheduler_output = message
            if replica != my_replica:
                continue
            try:
                reply = ("ok", worker.execute_model(scheduler_output))
            except BaseException as e:
                reply = ("error", format_failure(e))
            if rank == layout.output_rank(replica):
                dist.send_object_list([reply], dst=0, group=cpu_group)
            elif reply[0] == "error":
                raise RuntimeError(f"worker rank {rank} failed in execute_model: {reply[1]}")
    destroy_distributed()
