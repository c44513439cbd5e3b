"""Two real hosts on one machine: network namespaces joined by a veth pair, each with only that link and its
own loopback, and no default route. Processes inside see only their namespace's addresses, so a rank that
announces the wrong address (loopback, the machine's main IP) is caught, which ``ray.cluster_utils.Cluster``
(one shared network stack) cannot show. Everything started inside is killed and the namespaces are removed on
``close()``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable_reason() -> str | None:
    """Why two namespaces cannot be made here (None when they can)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    name = f"di-probe-{os.getpid()}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "delete", name, check=False)
    return None


class TwoHosts:
    """Hosts 0 and 1 at ``ips[0]`` and ``ips[1]`` (a /24 of their own, reachable only from each other)."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.names = [f"di-host0-{tag}", f"di-host1-{tag}"]
        # An address block that exists only inside these two namespaces.
        self.ips = ["10.231.77.1", "10.231.77.2"]
        self.procs: list[subprocess.Popen] = []
        try:
            for name in self.names:
                _ip("netns", "add", name)
                _ip("-n", name, "link", "set", "lo", "up")
            veth = [f"di0-{tag}", f"di1-{tag}"]
            _ip("link", "add", veth[0], "netns", self.names[0], "type", "veth", "peer", "name", veth[1],
                "netns", self.names[1])
            for name, dev, ip in zip(self.names, veth, self.ips):
                _ip("-n", name, "addr", "add", f"{ip}/24", "dev", dev)
                _ip("-n", name, "link", "set", dev, "up")
        except BaseException:
            self.close()
            raise

    def command(self, host: int, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[host], *args]

    def start(self, host: int, args: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
        """A background process on ``host`` (its output is captured; read it after it ends)."""
        proc = subprocess.Popen(self.command(host, args), env={**os.environ, **(env or {})}, text=True,
                                stdout=popen.pop("stdout", subprocess.PIPE), stderr=popen.pop("stderr", subprocess.STDOUT),
                                start_new_session=True, **popen)
        self.procs.append(proc)
        return proc

    def run(self, host: int, args: list[str], env: dict | None = None, timeout: float = 300) \
            -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, args), env={**os.environ, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)

    def pids(self, host: int) -> list[int]:
        out = _ip("netns", "pids", self.names[host], check=False).stdout
        return [int(p) for p in out.split()]

    def close(self) -> None:
        self.stop_all()
        for name in self.names:
            _ip("netns", "delete", name, check=False)

    def stop_all(self) -> None:
        """Ends every process started inside the hosts (those that daemonized included)."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.2)
        for host in range(len(self.names)):  # daemons that left their session: whatever still runs inside
            for pid in self.pids(host):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []
