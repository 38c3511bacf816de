"""Real worker processes, started the way a user starts them: ``faust -A marvin_faust worker``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from marvin_faust.partitioners import Partitioner, murmur2_partitioner

READY_LINE = "[^Worker]: Ready"
FAUST = str(Path(sys.executable).parent / "faust")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class WorkerProcess:
    """One ``faust -A marvin_faust worker`` process with its own web port and data dir."""

    env: dict[str, str]
    data_dir: Path
    log_path: Path
    web_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    # Data dir and web port as Faust's own options (--datadir, --web-port), not MARVIN_*.
    faust_options: bool = False

    def start(self, timeout: float = 90.0) -> WorkerProcess:
        env = {**os.environ, **self.env}
        before, after = [], []
        if self.faust_options:
            before = ["--datadir", str(self.data_dir)]
            after = ["--web-port", str(self.web_port)]
        else:
            env.update(MARVIN_DATA_DIR=str(self.data_dir), MARVIN_WEB_PORT=str(self.web_port))
        log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [FAUST, "-A", "marvin_faust", *before, "worker", "-l", "info", *after],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_for(READY_LINE, timeout)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        start = len(self.log_text()) if text != READY_LINE else 0
        while time.monotonic() < deadline:
            if text in self.log_text()[start:]:
                return
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"worker exited ({self.process.returncode}):\n{self.tail()}")
            time.sleep(0.2)
        raise AssertionError(f"no {text!r} after {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"


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


# -- A plain Kafka client, as an existing front end would be: no project code ------------------


def changelog_topic(app_id: str) -> str:
    """The history table's changelog topic, as Faust names it: ``<app id>-<table>-changelog``."""
    return f"{app_id}-conversation-history-changelog"


def one_conversation_per_partition(
    partitions: int, partitioner: Partitioner = murmur2_partitioner
) -> list[str]:
    """Conversation ids that ``partitioner`` (aiokafka's murmur2) puts on partitions 0, 1, ..."""
    every = list(range(partitions))
    found: dict[int, str] = {}
    while len(found) < partitions:
        cid = str(uuid.uuid4())
        found.setdefault(partitioner(cid.encode(), every, every), cid)
    return [found[p] for p in every]


def wire_value(cid: str, text: str, role: str = "human") -> bytes:
    return json.dumps(
        {
            "uuid": cid,
            "role": role,
            "text": text,
            "conversation_id": cid,
            "Timestamp": time.time_ns(),
        }
    ).encode()


async def produce(bootstrap: str, topic: str, records: list[tuple]) -> None:
    """Send ``(key, value[, headers])`` records in order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for key, value, *headers in records:
            await producer.send_and_wait(
                topic, key=key, value=value, headers=headers[0] if headers else None
            )
    finally:
        await producer.stop()


async def consume(
    bootstrap: str,
    topic: str,
    until,
    timeout: float = 60.0,
    settle: float = 0.0,
    isolation_level: str = "read_committed",  # aborted transactions are not replies
) -> list:
    """Read ``topic`` from the start until ``until(records)`` is true, then ``settle`` s more."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        isolation_level=isolation_level,
    )
    await consumer.start()
    records: list = []
    try:
        deadline = time.monotonic() + timeout
        done_at: float | None = None
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for messages in batch.values():
                records.extend(messages)
            if done_at is None and until(records):
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - done_at >= settle:
                return records
        raise AssertionError(f"timed out after {timeout}s with {len(records)} records on {topic}")
    finally:
        await consumer.stop()


def replies_for(records: list, cid: str) -> list[dict]:
    """The AI records of conversation ``cid`` (poison records on the topic are skipped)."""
    out = []
    for record in records:
        if record.key != cid.encode() or record.value is None:
            continue
        try:
            value = json.loads(record.value)
        except ValueError:
            continue
        if isinstance(value, dict) and value.get("role") == "AI":
            out.append({"value": value, "headers": dict(record.headers)})
    return out


def run(coro):
    return asyncio.run(coro)
