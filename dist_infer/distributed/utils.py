"""Addresses and ports for the TCP store the workers meet at."""

from __future__ import annotations

import socket


def get_open_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def get_ip() -> str:
    """This machine's address as other machines reach it (falls back to loopback when there is no route)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; this only picks the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def tcp_init_method(host: str, port: int) -> str:
    return f"tcp://{host}:{port}"
