"""Addresses and ports for the TCP store the workers meet at, and the interface their collectives use.

Which address a rank announces matters once ranks sit on different hosts: a guess from the default route
fails on hosts with no default route, and loopback handed to another host makes it dial itself. So the
rendezvous host is what the launcher knows (Ray's node IP, torchrun's MASTER_ADDR), ``DIST_INFER_HOST_IP``
overrides it (as ``VLLM_HOST_IP`` does for vLLM), and each rank picks the interface that routes to it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from urllib.parse import urlparse

HOST_IP_ENV = "DIST_INFER_HOST_IP"


def get_open_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def host_ip(known: str) -> str:
    """The address other hosts reach this one at: ``$DIST_INFER_HOST_IP``, else ``known`` (e.g. Ray's node IP)."""
    return os.environ.get(HOST_IP_ENV) or known


def local_ip_towards(host: str) -> str | None:
    """The local address this host would use to reach ``host`` (no packet is sent), or None without a route."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 1))
            return s.getsockname()[0]
    except OSError:
        return None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def interface_of(ip: str) -> str | None:
    """The network interface that holds ``ip`` on this host."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == ip for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)):
            return name
    return None


def rendezvous_host(init_method: str) -> str | None:
    """The host of ``tcp://host:port``, torchrun's ``MASTER_ADDR`` for ``env://``, loopback for ``file://``."""
    if init_method.startswith("env://"):
        return os.environ.get("MASTER_ADDR")
    if init_method.startswith("file://"):
        return "127.0.0.1"  # every rank on this host: gloo's connections need not leave it either
    return urlparse(init_method).hostname


def pin_gloo_interface(init_method: str) -> None:
    """Points gloo at the interface that routes to the rendezvous host, unless ``GLOO_SOCKET_IFNAME`` is set.

    Left alone, gloo resolves the host name, and where that fails (a host whose name maps to an address of
    another namespace, or none) it falls back to loopback and announces it to remote peers."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    host = rendezvous_host(init_method)
    if not host:
        return
    try:
        host = socket.gethostbyname(host)
    except OSError:
        return
    local = os.environ.get(HOST_IP_ENV) or local_ip_towards(host)
    name = interface_of(local) if local else None
    if name:
        os.environ["GLOO_SOCKET_IFNAME"] = name


def check_reachable(host: str, port: int, timeout_s: float = 10.0) -> str | None:
    """None when a TCP connection to ``host:port`` opens within ``timeout_s``, else why it did not."""
    deadline, last = time.monotonic() + timeout_s, "no attempt"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return None
        except OSError as e:
            last = f"{type(e).__name__}: {e}"
            time.sleep(0.2)
    return last


class ProbeListener:
    """Accepts connections on ``host`` for a moment so other ranks can prove they reach the rendezvous host."""

    def __init__(self, host: str):
        import threading

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            conn.close()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self.sock.close()


class LocalRendezvous:
    """A rendezvous for ranks that all run on this host: a file store in a private folder, no TCP port.

    torch's TCP store listens on every interface whatever host it is given, so a store for one host's ranks
    would still be open to the network; a file store is reachable only through this host's file system."""

    def __init__(self):
        import tempfile

        self.folder = tempfile.mkdtemp(prefix="dist-infer-rendezvous-")  # mode 0700
        self.init_method = f"file://{self.folder}/store"

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def tcp_init_method(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
