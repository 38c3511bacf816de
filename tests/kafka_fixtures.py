"""The ``kafka_broker`` fixture: a real, throw-away Apache Kafka broker for the test session.

Load with ``pytest_plugins = ["tests.kafka_fixtures"]`` (or ``-p tests.kafka_fixtures``). The
broker listens on free loopback ports, keeps its data and logs under pytest's tmp dir and shares
the jars of the repo's ``.kafka/lib`` (``$MARVIN_KAFKA_JARS`` if set), so they download once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_JARS = Path(os.environ.get("MARVIN_KAFKA_JARS") or REPO / ".kafka" / "lib")
LOOPBACK = "127.0.0.1"


def free_ports(count: int = 1, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct ports that are free on ``host`` right now."""
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


def make_broker(home: Path, jars_dir: Path = SHARED_JARS):
    """A ``LocalBroker`` (not started) in ``home`` on two free loopback ports."""
    # Imported here: ``marvin_faust``'s package import loads the Faust app and its settings,
    # which conftest.py sets up first.
    from marvin_faust.broker import BrokerConfig, LocalBroker

    port, controller_port = free_ports(2)
    config = BrokerConfig(
        host=LOOPBACK,
        port=port,
        controller_port=controller_port,
        home=home,
        jars_dir=jars_dir,
    )
    return LocalBroker(config)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A running ``marvin_faust.broker.LocalBroker``; clients use ``.bootstrap_servers``.

    Also: ``.config`` (``home``, ``port``, ``controller_port``, ``log_file``...), ``.pid``,
    ``.status()`` and ``.log_tail()``. Stopped (no process left) at the end of the session.
    """
    from marvin_faust.broker import BrokerError

    home = tmp_path_factory.mktemp("kafka-home")
    for attempt in range(3):
        broker = make_broker(home)
        try:
            broker.start(timeout=120)
            break
        except BrokerError as exc:
            # A free port can be taken between choosing it and binding it: choose again.
            if "already in use" not in str(exc) or attempt == 2:
                raise
    try:
        yield broker
    finally:
        broker.stop()
