"""The local Kafka broker (marvin_faust.broker) against real Kafka, Java and clients: no mocks."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from marvin_faust.testing.kafka import make_broker, shared_jars
from marvin_faust.testing.ports import LOOPBACK, free_ports
from marvin_faust.testing.processes import WorkerProcess, live_processes
from tests.fixtures import REPO

pytestmark = pytest.mark.kafka

BROKER_CLI = [sys.executable, "-m", "marvin_faust.broker"]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    """Run ``python -m marvin_faust.broker ARGS`` from the repo, as a user would."""
    return subprocess.run(
        [*BROKER_CLI, *args],
        cwd=REPO,
        env={**os.environ, "MARVIN_KAFKA_JARS": str(shared_jars()), **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_start(home: Path, port: int, controller_port: int) -> subprocess.CompletedProcess:
    """``python -m marvin_faust.broker start`` in ``home`` on the two ports."""
    ports = ["--port", str(port), "--controller-port", str(controller_port)]
    return cli("start", "--home", str(home), *ports)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI failed with a single ``Error: ...`` line on stderr; that line."""
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), result.stderr
    return lines[0]


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text``."""
    return [p.pid for p in live_processes() if text in p.cmdline]


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def create_topics(bootstrap: str, *names: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1) for name in names])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, key=key, value=value, headers=[("h", key)])
    finally:
        await producer.stop()


async def consume(bootstrap: str, topic: str, count: int, timeout: float = 60.0) -> list:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=unique("test-group"),
    )
    await consumer.start()
    records: list = []
    try:
        deadline = time.monotonic() + timeout
        while len(records) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                records.extend(messages)
    finally:
        await consumer.stop()
    return records


# -- The broker answers real clients ------------------------------------------------------


@pytest.mark.timeout(300)  # the first test may fetch the jars (cold: about 20 s) and start
def test_fixture_broker_is_running(kafka_broker):
    from marvin_faust.broker import metadata_brokers

    status = kafka_broker.status()
    assert status.running
    assert status.pid == kafka_broker.pid
    assert status.bootstrap_servers == kafka_broker.bootstrap_servers
    assert status.kafka_version == kafka_broker.config.kafka_version
    assert kafka_broker.bootstrap_servers == f"{LOOPBACK}:{kafka_broker.config.port}"
    assert metadata_brokers(LOOPBACK, kafka_broker.config.port) == [
        (1, LOOPBACK, kafka_broker.config.port)
    ]
    # Its log goes to the file of the log4j2 config, not to the console.
    assert "Kafka Server started" in kafka_broker.config.log_file.read_text()
    assert "Kafka Server started" not in kafka_broker.config.console_file.read_text()


@pytest.mark.timeout(120)
def test_aiokafka_round_trip(kafka_broker):
    topic = unique("round-trip")  # auto-created by the first send
    records = [(f"k{i}".encode(), f"value {i}".encode()) for i in range(5)]

    asyncio.run(produce(kafka_broker.bootstrap_servers, topic, records))
    received = asyncio.run(consume(kafka_broker.bootstrap_servers, topic, len(records)))

    assert [(r.key, r.value) for r in received] == records
    assert [r.offset for r in received] == list(range(5))
    assert [dict(r.headers)["h"] for r in received] == [key for key, _ in records]


@pytest.mark.timeout(180)
def test_faust_worker_forwards_between_topics(kafka_broker, tmp_path):
    source, sink = unique("faust-in"), unique("faust-out")
    bootstrap = kafka_broker.bootstrap_servers
    asyncio.run(create_topics(bootstrap, source, sink))
    env = {
        "PYTHONPATH": str(REPO),
        "ROUNDTRIP_BOOTSTRAP": bootstrap,
        "ROUNDTRIP_APP_ID": unique("roundtrip"),
        "ROUNDTRIP_IN": source,
        "ROUNDTRIP_OUT": sink,
        "ROUNDTRIP_DATADIR": str(tmp_path / "faust-data"),
    }
    # Faust's own --datadir and --web-port: the app reads no MARVIN_* setting, and its web server
    # gets a free port (6066 may be taken by a worker running beside the tests).
    worker = WorkerProcess(
        env=env,
        data_dir=tmp_path / "faust-data",
        log_path=tmp_path / "worker.log",
        faust_options=True,
        app="tests.e2e.faust_roundtrip_app",
        cwd=REPO,
    )
    try:
        worker.start(timeout=90)

        records = [(b"a", b"first"), (b"b", b"second")]
        asyncio.run(produce(bootstrap, source, records))
        received = asyncio.run(consume(bootstrap, sink, len(records)))

        assert [(r.key, r.value) for r in received] == [
            (b"a", b"forwarded:first"),
            (b"b", b"forwarded:second"),
        ]
        assert worker.process is not None and worker.process.poll() is None
    finally:
        worker.stop()
    assert "Traceback" not in worker.log_text()


# -- The command line: lifecycle and clear errors --------------------------------------------


@pytest.mark.timeout(180)
def test_cli_start_status_stop_leaves_nothing_behind(tmp_path):
    home = tmp_path / "home"
    port, controller_port = free_ports(2)
    home.mkdir()
    # A pid file naming a live process that is not this home's broker (this test) is stale.
    (home / "broker.pid").write_text(f"{os.getpid()}\n")

    stopped = cli("status", "--home", str(home))
    assert stopped.returncode == 0, stopped
    assert stopped.stdout.strip() == f"stopped (home {home})"

    started = cli_start(home, port, controller_port)
    assert started.returncode == 0, started
    assert f"broker running on {LOOPBACK}:{port} (pid " in started.stdout
    pid = int((home / "broker.pid").read_text())
    assert pid != os.getpid()
    try:
        assert processes_mentioning(str(home)) == [pid]
        assert (home / "data" / "meta.properties").is_file()

        running = cli("status", "--home", str(home))
        assert running.returncode == 0
        assert running.stdout.startswith(f"running on {LOOPBACK}:{port} (pid {pid}, Kafka ")

        # The broker started by a process that has exited answers real clients.
        topic = unique("cli")
        asyncio.run(produce(f"{LOOPBACK}:{port}", topic, [(b"k", b"v")]))
        received = asyncio.run(consume(f"{LOOPBACK}:{port}", topic, 1))
        assert [(r.key, r.value) for r in received] == [(b"k", b"v")]
    finally:
        result = cli("stop", "--home", str(home))
    assert result.returncode == 0, result
    assert result.stdout.strip() == f"stopped the broker on {LOOPBACK}:{port} (pid {pid})"
    assert processes_mentioning(str(home)) == []
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert not (home / "broker.pid").exists()

    after = cli("status", "--home", str(home))
    assert after.stdout.strip() == f"stopped (home {home})"
    again = cli("stop", "--home", str(home))
    assert again.returncode == 0
    assert again.stdout.strip() == f"no broker running (home {home})"


@pytest.mark.timeout(120)
def test_cli_refuses_a_second_broker_in_a_running_home(kafka_broker):
    home = kafka_broker.config.home
    pid = kafka_broker.pid
    other_port, other_controller_port = free_ports(2)

    result = cli_start(home, other_port, other_controller_port)

    line = one_error_line(result)
    assert f"already running on {kafka_broker.bootstrap_servers} (pid {pid})" in line
    assert processes_mentioning(str(home)) == [pid]
    assert kafka_broker.pid == pid
    assert int(kafka_broker.config.pid_file.read_text()) == pid


@pytest.mark.timeout(60)
@pytest.mark.parametrize("role", ["broker", "controller"])
def test_cli_refuses_a_taken_port(tmp_path, role):
    home = tmp_path / "home"
    port, controller_port = free_ports(2)
    taken = port if role == "broker" else controller_port
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, taken))
        squatter.listen()
        result = cli_start(home, port, controller_port)

    line = one_error_line(result)
    assert f"port {taken} on {LOOPBACK} (the {role} port) is already in use" in line
    assert not (home / "broker.pid").exists()
    assert processes_mentioning(str(home)) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["path-without-java", "bad-MARVIN_JAVA"])
def test_cli_says_when_java_is_missing(tmp_path, how):
    home = tmp_path / "home"
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    (port,) = free_ports(1)
    env = {"PATH": str(empty_bin), "JAVA_HOME": "", "MARVIN_JAVA": ""}
    if how == "bad-MARVIN_JAVA":
        env = {"MARVIN_JAVA": str(tmp_path / "no-such-java")}

    result = cli("start", "--home", str(home), "--port", str(port), env=env)

    line = one_error_line(result)
    assert line.startswith("Error: Java not found: ")
    if how == "path-without-java":
        assert "install a Java 17 runtime" in line
    else:
        assert "no-such-java" in line
    assert not (home / "broker.pid").exists()
    assert processes_mentioning(str(home)) == []


@pytest.mark.timeout(60)
def test_cli_says_when_maven_is_missing(tmp_path):
    """No jars yet and no ``mvn`` on PATH (Java is there): the error names Maven."""
    home = tmp_path / "home"
    java_only = tmp_path / "bin"
    java_only.mkdir()
    java = subprocess.run(
        ["sh", "-c", "command -v java"], capture_output=True, text=True, check=True
    ).stdout.strip()
    (java_only / "java").symlink_to(Path(java).resolve())
    (port,) = free_ports(1)

    result = cli(
        "start",
        "--home",
        str(home),
        "--port",
        str(port),
        env={"PATH": str(java_only), "JAVA_HOME": "", "MARVIN_KAFKA_JARS": str(tmp_path / "jars")},
    )

    line = one_error_line(result)
    assert line.startswith("Error: Maven not found: install Maven")
    assert not (tmp_path / "jars").exists()
    assert processes_mentioning(str(home)) == []


@pytest.mark.timeout(120)
def test_start_failure_reports_the_broker_output(tmp_path):
    """A broker that exits during start: a BrokerError with its output, and no pid file."""
    from marvin_faust.broker import BrokerConfig, BrokerError, LocalBroker

    good = make_broker(tmp_path / "home")
    config = BrokerConfig(
        host=good.config.host,
        port=good.config.port,
        controller_port=good.config.controller_port,
        home=good.config.home,
        jars_dir=good.config.jars_dir,
        heap="not-a-size",  # the JVM refuses to start
    )
    broker = LocalBroker(config)

    with pytest.raises(BrokerError, match="the broker exited during start") as failure:
        broker.start(timeout=60)

    assert "Invalid maximum heap size" in str(failure.value)
    assert broker.pid is None
    assert not config.pid_file.exists()
    assert processes_mentioning(str(config.home)) == []


def test_config_defaults_and_cluster_id(tmp_path, monkeypatch):
    from marvin_faust.broker import BrokerConfig, BrokerError, new_cluster_id

    monkeypatch.setenv("MARVIN_KAFKA_HOME", str(tmp_path / "kafka"))
    monkeypatch.delenv("MARVIN_KAFKA_JARS", raising=False)
    config = BrokerConfig()
    assert config.bootstrap_servers == "127.0.0.1:9092"
    assert config.controller_port == 9093
    assert config.home == tmp_path / "kafka"
    assert config.jars_dir == tmp_path / "kafka" / "lib"
    assert config.data_dir == tmp_path / "kafka" / "data"
    assert config.logs_dir == tmp_path / "kafka" / "logs"

    cluster_id = new_cluster_id()
    assert len(cluster_id) == 22
    assert set(cluster_id) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )
    assert cluster_id != new_cluster_id()
    # 1 in 64 random ids starts with "-", which the storage tool takes for an option.
    assert not any(new_cluster_id().startswith("-") for _ in range(1000))

    with pytest.raises(BrokerError, match="must differ"):
        BrokerConfig(port=9092, controller_port=9092)
