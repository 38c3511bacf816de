"""The fixtures that start real things: ``kafka_broker`` (a throw-away Apache Kafka broker for
the test session), ``worker_env`` and ``start_worker`` (worker processes on it).

Loaded by ``tests/conftest.py`` (``pytest_plugins``). The helpers behind them are in
``marvin_faust.testing``; the broker listens on free loopback ports, keeps its data and logs
under pytest's tmp dir and shares the jars of the repo's ``.kafka/lib`` (``$MARVIN_KAFKA_JARS``
if set), so they download once.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from marvin_faust.testing.kafka import start_broker
from marvin_faust.testing.processes import WorkerProcess

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A running ``marvin_faust.broker.LocalBroker``; clients use ``.bootstrap_servers``.

    Also: ``.config`` (``home``, ``port``, ``controller_port``, ``log_file``...), ``.pid``,
    ``.status()`` and ``.log_tail()``. Stopped (no process left) at the end of the session.
    """
    broker = start_broker(tmp_path_factory.mktemp("kafka-home"), timeout=120)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture()
def worker_env(kafka_broker, tmp_path) -> dict[str, str]:
    """Settings for a worker on the test broker, with topics of its own."""
    suffix = uuid.uuid4().hex[:8]
    return {
        "MARVIN_BROKER": f"kafka://{kafka_broker.bootstrap_servers}",
        "MARVIN_APP_ID": f"marvin-test-{suffix}",
        "MARVIN_TOPIC": f"chat-{suffix}",
        "MARVIN_DEAD_LETTER_TOPIC": f"chat-{suffix}-dead-letters",
        "MARVIN_PARTITIONS": "2",
        "MARVIN_BACKEND": "standin",
        "MARVIN_STORE": "rocksdb://",
    }


@pytest.fixture()
def start_worker(worker_env, tmp_path) -> Iterator:
    """``start_worker(**env)`` starts a worker; all are stopped at the end of the test."""
    workers: list[WorkerProcess] = []

    def start(data_dir: Path | None = None, **env: str) -> WorkerProcess:
        index = len(workers)
        worker = WorkerProcess(
            env={**worker_env, **env},
            data_dir=data_dir or tmp_path / f"worker-{index}",
            log_path=tmp_path / f"worker-{index}.log",
        )
        workers.append(worker)
        return worker.start()

    yield start
    for worker in workers:
        worker.stop()
