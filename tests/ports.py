"""Ports for the servers tests start (Ray nodes, moto, MLflow, proxies), drawn where the kernel never hands one out.

A port found free with a bind to port 0 comes from the kernel's ephemeral range, and is free again the moment the
test lets go of it: any process that binds port 0 before the server takes it (a Ray node picks its metrics and gRPC
ports that way) can be handed the very same number. Seen in CI: a Ray head's metrics exporter took the port the test
had chosen for the dashboard agent, and the health probe read Prometheus metrics. Ports below the ephemeral range are
only ever taken by a process that names them, so a test's choice stays its own. They start above Ray's default
worker port range (10002-19999): a `ray start` without a range of its own refuses a port of its other components
that lies in it.
"""

from __future__ import annotations

import secrets
import socket

LOW = 20000  # above Ray's default --max-worker-port


def ephemeral_low() -> int:
    """The lowest port the kernel hands out on its own (to a bind to port 0, to a client socket)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# Every port this process has handed out: a port chosen for a server that has not bound it yet (a Ray head's GCS
# port, drawn before `ray start`) is still free to a bind, and must not be handed out twice.
_handed: set[int] = set()


def free_port_range(size: int, low: int = LOW, high: int | None = None) -> tuple[int, int]:
    """`size` consecutive ports, free now, below the kernel's ephemeral range, none handed out before here."""
    high = high or ephemeral_low()
    for _ in range(500):
        start = secrets.randbelow(high - low - size) + low
        ports = range(start, start + size)
        if _handed.isdisjoint(ports) and all(_bindable(port) for port in ports):
            _handed.update(ports)
            return start, start + size - 1
    raise RuntimeError(f"no {size} free consecutive ports in {low}-{high}")


def free_port() -> int:
    """One port, free now, below the kernel's ephemeral range (random, so parallel test workers rarely meet)."""
    return free_port_range(1)[0]
