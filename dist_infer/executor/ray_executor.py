"""Workers as Ray actors in placement groups (``distributed_executor_backend="ray"``).

Placement: one placement group per (replica, pipeline stage) holding that stage's tensor-parallel workers,
one bundle each, ``STRICT_PACK`` so a tensor-parallel group never spans nodes. With
``pipeline_placement="SPREAD"`` each later stage of a replica is kept off the nodes of its earlier stages
(through the ``ray.io/node-id`` label). Bundles ask for one GPU per worker where the cluster has GPUs,
else CPUs; an actor's threads follow the CPUs Ray gave it, and Ray's ``CUDA_VISIBLE_DEVICES`` picks its GPU.

The executor joins the cluster at ``ray_address`` or ``$RAY_ADDRESS``, else starts a private local Ray instance
(loopback only, token authentication; see ``ray_cluster``), which it shuts down again on ``shutdown()``.
Actors and placement groups are always removed on shutdown.

Rendezvous: when every worker runs on the driver's node, a file store in a private folder (no TCP port, which
torch would open on every interface). Otherwise rank 0's actor announces ``tcp://<its node IP>:<port>``, the
address Ray already knows for its node (``DIST_INFER_HOST_IP`` overrides it). Loopback is never handed to a worker on another node, and before
any worker loads, every rank proves it can open a connection to that host; one that cannot fails the start at
once, naming its rank, its node and the address.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import Future

from dist_infer.config import EngineConfig
from dist_infer.distributed.utils import LocalRendezvous, ProbeListener, check_reachable, get_open_port, host_ip, is_loopback, \
    tcp_init_method
from dist_infer.engine.messages import SchedulerOutput
from dist_infer.executor import ray_cluster
from dist_infer.executor.base import format_failure, run_method
from dist_infer.executor.distributed import DistributedExecutor, WorkerHandle


class RayWorkerActor:
    """Hosts one Worker inside a Ray actor; errors travel back as text so they need no pickling of their own."""

    def __init__(self):
        self.worker = None
        self.probe = None

    def node_info(self) -> dict:
        import ray

        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "ip": host_ip(ray.util.get_node_ip_address()), "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def free_port(self) -> int:
        return get_open_port()

    def open_probe(self, host: str) -> int:
        """Starts listening on ``host`` (rank 0's rendezvous host) for the other ranks' reachability check."""
        self.probe = ProbeListener(host)
        return self.probe.port

    def close_probe(self) -> None:
        if self.probe is not None:
            self.probe.close()
            self.probe = None

    def reach(self, host: str, port: int, timeout_s: float) -> str | None:
        return check_reachable(host, port, timeout_s)

    def init_worker(self, config: EngineConfig, rank: int, init_method: str,
                    local_world_size: int = 1, world_ranks: list[int] | None = None) -> tuple[str, object]:
        from dist_infer.worker.worker import Worker

        threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or None
        try:
            self.worker = Worker(config, rank, init_method, local_rank=0, num_threads=threads,
                                 local_world_size=local_world_size, world_ranks=world_ranks)
        except BaseException as e:
            return "error", format_failure(e)
        return "ok", None

    def call(self, method, args, kwargs) -> tuple[str, object]:
        import ray

        try:
            # A scheduler output arrives as a reference to the one stored copy.
            args = tuple(ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args)
            return "ok", run_method(self.worker, method, args, kwargs)
        except BaseException as e:
            return "error", format_failure(e)


class RayWorker(WorkerHandle):
    def __init__(self, actor, rank: int, coords):
        super().__init__(rank, coords)
        self.actor = actor

    def _wrap(self, ref, what: str) -> Future:
        """Turns the actor's ("ok"/"error", payload) reply, or its death, into a future."""
        import ray

        outer: Future = Future()

        def settle(inner: Future) -> None:
            try:
                status, payload = inner.result()
            except ray.exceptions.RayActorError as e:
                outer.set_exception(self.error(what, f"the actor died ({type(e).__name__}: {e})"))
                return
            except BaseException as e:
                outer.set_exception(self.error(what, format_failure(e)))
                return
            if status == "ok":
                outer.set_result(payload)
            else:
                outer.set_exception(self.error(what, payload))

        ref.future().add_done_callback(settle)
        return outer

    def call(self, method, args=(), kwargs=None) -> Future:
        what = method if isinstance(method, str) else getattr(method, "__name__", "rpc")
        return self._wrap(self.actor.call.remote(method, args, kwargs or {}), what)

    def shutdown(self, graceful: bool = True) -> None:
        import ray

        try:
            ray.kill(self.actor)
        except Exception:  # already gone
            pass


class RayExecutor(DistributedExecutor):
    """The workers of one data-parallel replica (``None``: of every replica, in one world) as Ray actors, in
    placement groups of their own (one per replica and stage)."""

    def __init__(self, config: EngineConfig, replica: int | None = 0, workers_per_node: Counter | None = None):
        """``workers_per_node``: this engine's workers already running on each node (other replicas); they
        share a node's RAM with this replica's, so they split its CPU KV-cache budget."""
        super().__init__(config, replica)
        import ray

        # A private instance offers a CPU slot per worker even on a smaller machine; the workers then share its
        # cores, each with one thread. (The engine opens the instance first: see ``open_session``.)
        self._started_ray = ray_cluster.connect(config.parallel_config.ray_address,
                                                num_cpus=max(os.cpu_count() or 1, self.layout.world_size))
        self.placement_groups, self.rendezvous = [], None
        try:
            self._start_workers(config, workers_per_node or Counter())
        except BaseException:
            self.shutdown()
            raise

    @staticmethod
    def open_session(config: EngineConfig, planned_workers: int) -> bool:
        """Joins or starts the Ray cluster for the engine's replicas; True when it started a private one (the
        caller then stops it with ``close_session`` once every replica is gone)."""
        return ray_cluster.connect(config.parallel_config.ray_address,
                                   num_cpus=max(os.cpu_count() or 1, planned_workers))

    @staticmethod
    def close_session() -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()

    def _check_fits(self, bundle: dict) -> None:
        """Fails at once, naming what is missing, when no placement could ever satisfy the replica."""
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        size = len(self.ranks)
        need_total = {k: v * size for k, v in bundle.items()}
        have_total = {k: sum(n.get(k, 0) for n in nodes) for k in bundle}
        best_node = {k: max((n.get(k, 0) for n in nodes), default=0) for k in bundle}
        stage = {k: v * self.layout.tp for k, v in bundle.items()}
        if any(have_total[k] < need_total[k] for k in bundle) or any(best_node[k] < stage[k] for k in bundle):
            raise RuntimeError(
                f"the Ray cluster cannot hold {self._what()}: its {size} workers need {need_total} in all "
                f"and {stage} on one node per tensor-parallel group; the cluster has {have_total} in all, at most "
                f"{best_node} on one node"
            )

    def _what(self) -> str:
        return f"replica {self.replica}" if self.replica is not None else f"replicas {self.replicas}"

    def _bundle(self) -> dict:
        import ray

        gpus = ray.cluster_resources().get("GPU", 0)
        return {"GPU": 1, "CPU": 1} if gpus >= 1 else {"CPU": 1}

    def _start_workers(self, config: EngineConfig, workers_per_node: Counter) -> None:
        import ray

        layout, parallel = self.layout, config.parallel_config
        bundle = self._bundle()
        self._check_fits(bundle)
        actor_cls = ray.remote(RayWorkerActor)
        actors: dict[int, object] = {}
        for d in self.replicas:
            self._place_replica(d, bundle, actor_cls, actors, parallel)
        self.handles = {r: RayWorker(actors[r], r, layout.coords(r)) for r in self.ranks}
        infos = ray.get([self.handles[r].actor.node_info.remote() for r in self.ranks])
        self.nodes = [info["node_id"] for info in infos]
        first = self.handles[self.ranks[0]]
        if all(info["node_id"] == ray.get_runtime_context().get_node_id() for info in infos):
            self.rendezvous = LocalRendezvous()  # every rank beside the driver: no TCP port at all
            init_method = self.rendezvous.init_method
        else:
            ip = infos[0]["ip"]
            self._check_rendezvous(ip, infos)
            init_method = tcp_init_method(ip, ray.get(first.actor.free_port.remote()))
        # Workers on one node share its RAM, so they split its CPU KV-cache budget.
        per_node = Counter(self.nodes) + workers_per_node
        loads = [self.handles[r]._wrap(self.handles[r].actor.init_worker.remote(
                     config, r, init_method, per_node[info["node_id"]], self.ranks), "load")
                 for r, info in zip(self.ranks, infos)]
        self.wait_loaded(loads)

    def _place_replica(self, d: int, bundle: dict, actor_cls, actors: dict, parallel) -> None:
        """One placement group per stage of replica ``d``, and an actor per worker in it."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        layout = self.layout
        used_nodes: list[str] = []
        for p in range(layout.pp):
            selector = None
            if parallel.pipeline_placement == "SPREAD" and used_nodes:
                selector = [{"ray.io/node-id": f"!in({','.join(used_nodes)})"}] * layout.tp
            pg = placement_group([dict(bundle)] * layout.tp, strategy="STRICT_PACK",
                                 bundle_label_selector=selector)
            self.placement_groups.append(pg)
            ready, _ = ray.wait([pg.ready()], timeout=parallel.worker_load_timeout_s)
            if not ready:
                raise RuntimeError(
                    f"Ray could not place replica {d} stage {p} ({layout.tp} x {bundle}, one node"
                    f"{', apart from its other stages' if selector else ''}) within "
                    f"{parallel.worker_load_timeout_s:.0f}s; "
                    f"cluster resources: {ray.available_resources()}"
                )
            for t in range(layout.tp):
                rank = layout.rank(d, p, t)
                actors[rank] = actor_cls.options(
                    num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=t),
                ).remote()
            used_nodes.append(ray.get(actors[layout.rank(d, p, 0)].node_info.remote())["node_id"])

    def _check_rendezvous(self, ip: str, infos: list[dict], timeout_s: float = 15.0) -> None:
        """Fails at once, naming the rank, when a worker cannot reach rank 0's host at ``ip``."""
        import ray

        remote = [r for r, info in zip(self.ranks, infos) if info["node_id"] != infos[0]["node_id"]]
        if remote and is_loopback(ip):
            raise RuntimeError(
                f"rank 0 would announce the loopback address {ip} as the rendezvous, but ranks {remote} run on "
                f"other nodes; start Ray with --node-ip-address set to an address the nodes share, or set "
                f"DIST_INFER_HOST_IP on rank 0's node")
        if not remote:
            return
        master = self.handles[self.ranks[0]].actor
        try:
            port = ray.get(master.open_probe.remote(ip))
        except ray.exceptions.RayTaskError as e:
            raise RuntimeError(f"rank 0 (node {infos[0]['ip']}) cannot listen on its rendezvous address {ip}: "
                               f"{e.cause}; is DIST_INFER_HOST_IP an address of that node?") from None
        try:
            answers = ray.get([self.handles[r].actor.reach.remote(ip, port, timeout_s) for r in remote])
        finally:
            ray.get(master.close_probe.remote())
        failed = [(r, infos[self.ranks.index(r)], why) for r, why in zip(remote, answers) if why is not None]
        if failed:
            r, info, why = failed[0]
            raise RuntimeError(
                f"rank {r} (coords dp/pp/tp {self.layout.coords(r)}, node {info['ip']}) cannot reach the rendezvous "
                f"host {ip} of rank 0 within {timeout_s:.0f}s ({why}); "
                f"{len(failed)} of {len(remote)} ranks on other nodes failed. Check that the nodes' addresses "
                f"route to each other, or set DIST_INFER_HOST_IP to rank 0's reachable address")

    def prepare_payload(self, scheduler_output: SchedulerOutput):
        import ray

        return ray.put(scheduler_output)  # stored once, fetched by every worker of the replica

    def node_ids(self) -> list[str]:
        """The node each worker runs on, in rank order (as the workers themselves report it)."""
        import ray

        return [info["node_id"] for info in ray.get([self.handles[r].actor.node_info.remote() for r in self.ranks])]

    def shutdown(self, graceful: bool = True) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        super().shutdown(graceful)
        for pg in getattr(self, "placement_groups", []):
            try:
                remove_placement_group(pg)
            except Exception:  # already removed
                pass
        self.placement_groups = []
        if getattr(self, "rendezvous", None) is not None:
            self.rendezvous.close()
            self.rendezvous = None
        if getattr(self, "_started_ray", False) and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False
