"""Two real hosts (network namespaces joined by a veth pair, no default route): tensor parallelism inside a
host and pipeline parallelism across the hosts, under Ray and under torchrun with two nodes, give Hugging
Face's output; a rendezvous address the other host cannot reach fails the start at once, naming the rank."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from netns_hosts import TwoHosts, unavailable_reason
from parallel_helpers import hf_greedy_text, wait_until

pytestmark = pytest.mark.slow

PROMPT, NEW_TOKENS = "The history of computing", 10
RAY_PORT = 6391


@pytest.fixture(scope="module")
def hosts():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"two-host tests need network namespaces: {reason}")
    two = TwoHosts()
    yield two
    two.close()


@pytest.fixture(scope="module")
def expected(tiny_llama_with_tokenizer):
    return hf_greedy_text(tiny_llama_with_tokenizer, PROMPT, NEW_TOKENS)


def _generate_args(model: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "dist_infer.entrypoints.cli", "generate", "--model", model, "--no-chat",
            "--tp", "2", "--pp", "2", "--max-tokens", str(NEW_TOKENS), "--kv-cache-memory", str(1 << 22),
            "--worker-timeout", "120", *flags, PROMPT]


_COUNT_NODES = """
import ray, sys
ray.init(address=sys.argv[1], log_to_driver=False)
print(sum(n["Alive"] for n in ray.nodes()))
"""


@pytest.fixture(scope="module")
def ray_cluster(hosts):
    """A Ray head on host 0 and a worker on host 1, two CPUs each: a tp=2 stage fills a host."""
    address = f"{hosts.ips[0]}:{RAY_PORT}"
    # Short: Ray's socket paths below it must fit AF_UNIX's 107 bytes, which pytest's tmp_path can exceed.
    temp = Path(tempfile.mkdtemp(prefix="di-ray-", dir="/tmp"))
    try:
        yield _start_two_nodes(hosts, address, temp)
    finally:
        hosts.stop_all()
        shutil.rmtree(temp, ignore_errors=True)


def _start_two_nodes(hosts, address: str, temp: Path) -> str:
    common = ["--block", "--num-cpus", "2", "--disable-usage-stats"]
    head = hosts.start(0, ["ray", "start", "--head", "--port", str(RAY_PORT), "--node-ip-address", hosts.ips[0],
                           "--include-dashboard", "false", "--temp-dir", str(temp / "head"), *common])

    def nodes_alive() -> int:
        if head.poll() is not None:
            raise RuntimeError(f"the Ray head exited: {head.stdout.read()[-2000:]}")
        out = hosts.run(0, [sys.executable, "-c", _COUNT_NODES, address], timeout=60)
        return int(out.stdout.split()[-1]) if out.returncode == 0 and out.stdout.split() else 0

    assert wait_until(lambda: nodes_alive() >= 1, timeout=120, interval=1), "the Ray head did not come up"
    worker = hosts.start(1, ["ray", "start", "--address", address, "--node-ip-address", hosts.ips[1],
                             "--temp-dir", str(temp / "worker"), *common])
    if not wait_until(lambda: worker.poll() is not None or nodes_alive() == 2, timeout=120, interval=1) \
            or worker.poll() is not None:
        hosts.stop_all()
        pytest.fail(f"the Ray worker did not join: {worker.stdout.read()[-3000:]}")
    return address


def test_ray_tp_inside_a_host_pp_across_hosts(hosts, ray_cluster, tiny_llama_with_tokenizer, expected):
    result = hosts.run(0, _generate_args(tiny_llama_with_tokenizer, "--executor", "ray", "--ray-address", ray_cluster,
                                         "--pipeline-placement", "SPREAD"), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == expected


_UNREACHABLE = """
import sys, time
import ray
from dist_infer import LLM

address, model, announce = sys.argv[1:4]
ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": {"DIST_INFER_HOST_IP": announce}})
start = time.monotonic()
try:
    LLM(model=model, skip_tokenizer_init=True, kv_cache_memory=1 << 22, distributed_executor_backend="ray",
        tensor_parallel_size=2, pipeline_parallel_size=2, pipeline_placement="SPREAD", worker_timeout_s=300)
except RuntimeError as e:
    print(f"{time.monotonic() - start:.1f}")
    print(e)
else:
    print("started")
"""


@pytest.mark.parametrize("announce, message", [
    ("127.0.0.1", "would announce the loopback address 127.0.0.1 as the rendezvous, but ranks [2, 3] run on other nodes"),
    ("10.231.99.1", "cannot reach the rendezvous host 10.231.99.1 of rank 0"),
])
def test_unreachable_rendezvous_fails_at_once(hosts, ray_cluster, tiny_llama_with_tokenizer, announce, message):
    # 10.231.99.1 lives on each host's own loopback: rank 0 can listen on it wherever Ray placed it, and a rank
    # on the other host dials its own loopback, where nothing listens, like a worker handed 127.0.0.1.
    for host in (0, 1):
        added = hosts.run(host, ["ip", "addr", "replace", "10.231.99.1/32", "dev", "lo"])
        assert added.returncode == 0, added.stderr
    result = hosts.run(0, [sys.executable, "-c", _UNREACHABLE, ray_cluster, tiny_llama_with_tokenizer, announce],
                       timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seconds, text = result.stdout.split("\n", 1)
    assert message in text, text
    assert float(seconds) < 60, (seconds, text)  # not the 300 s worker timeout


def test_torchrun_two_nodes(hosts, tiny_llama_with_tokenizer, expected):
    procs = [hosts.start(node, [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                                str(node), "--nproc-per-node", "2", "--master-addr", hosts.ips[0], "--master-port",
                                "29533", "-m", "dist_infer.launch", *_generate_args(tiny_llama_with_tokenizer)[3:]],
                         stderr=subprocess.PIPE)
             for node in (0, 1)]
    deadline = time.monotonic() + 400
    outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert outputs[0][0].strip() == expected  # rank 0, on host 0, prints the command's output
