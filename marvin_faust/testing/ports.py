"""Free loopback ports for the brokers, workers and web servers that tests and the bench start."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_ports(count: int = 1, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct ports that are free on ``host`` right now.

    A port can still be taken between this call and its use: callers that bind a server retry
    with new ports (``kafka.start_broker``).
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
