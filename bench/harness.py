"""The bench's own Kafka broker and worker processes, and what it records about the machine.

Workers are started exactly as in the end-to-end tests (``marvin_faust.testing.processes``'
``WorkerProcess``: ``faust -A marvin_faust worker -l info``, ready at "[^Worker]: Ready"), the
broker as the tests' (``marvin_faust.testing.kafka.start_broker``: a ``LocalBroker`` on free
loopback ports, sharing ``.kafka/lib``).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from marvin_faust.broker import LocalBroker
from marvin_faust.testing.kafka import start_broker
from marvin_faust.testing.processes import WorkerProcess, stop_group

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"


@dataclass
class Cluster:
    """One broker and the workers started on it; each worker gets its own app id and topics."""

    broker: LocalBroker
    workdir: Path
    partitions: int
    workers: list[WorkerProcess] = field(default_factory=list)
    loops: list[BareLoopProcess] = field(default_factory=list)

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap_servers

    def app_env(self, name: str) -> dict[str, str]:
        """Settings for a fresh app: its own id, chat topic and dead-letter topic."""
        suffix = f"{name}-{uuid.uuid4().hex[:6]}"
        return {
            "MARVIN_BROKER": f"kafka://{self.bootstrap}",
            "MARVIN_APP_ID": f"bench-{suffix}",
            "MARVIN_TOPIC": f"chat-{suffix}",
            "MARVIN_DEAD_LETTER_TOPIC": f"chat-{suffix}-dead-letters",
            "MARVIN_PARTITIONS": str(self.partitions),
            "MARVIN_STORE": "rocksdb://",
            "MARVIN_BACKEND": "standin",
            "MARVIN_STANDIN_LATENCY": "0",
        }

    def worker(
        self, env: dict[str, str], name: str, data_dir: Path | None = None, wait: bool = True
    ) -> WorkerProcess:
        """A worker process (started and Ready unless ``wait`` is false: then call ``start``)."""
        index = len(self.workers)
        topics = [env["MARVIN_TOPIC"], env["MARVIN_DEAD_LETTER_TOPIC"]]
        asyncio.run(create_topics(self.bootstrap, topics, int(env["MARVIN_PARTITIONS"])))
        worker = WorkerProcess(
            env=env,
            data_dir=data_dir or self.workdir / f"{index:02d}-{name}-state",
            log_path=self.workdir / f"{index:02d}-{name}.log",
        )
        self.workers.append(worker)
        if wait:
            worker.start(timeout=300)
        return worker

    def faust_loop(self, env: dict[str, str], name: str) -> FaustLoopProcess:
        """The minimal Faust agent on ``env``'s topic, started (Ready)."""
        topics = [env["MARVIN_TOPIC"]]
        asyncio.run(create_topics(self.bootstrap, topics, int(env["MARVIN_PARTITIONS"])))
        index = len(self.workers)
        loop = FaustLoopProcess(
            env=env,
            data_dir=self.workdir / f"{index:02d}-{name}-state",
            log_path=self.workdir / f"{index:02d}-{name}.log",
        )
        self.workers.append(loop)
        return loop.start(timeout=300)

    def bare_loop(self, name: str, latency: float, mode: str) -> BareLoopProcess:
        """The baseline loop on a topic of its own, started (it owns the partitions)."""
        topic = f"bare-{name}-{uuid.uuid4().hex[:6]}"
        asyncio.run(create_topics(self.bootstrap, [topic], self.partitions))
        index = len(self.loops)
        loop = BareLoopProcess(
            bootstrap=self.bootstrap,
            topic=topic,
            latency=latency,
            mode=mode,
            log_path=self.workdir / f"bare-{index:02d}-{name}.log",
        )
        self.loops.append(loop)
        return loop.start()

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop()
        for loop in self.loops:
            loop.stop()


@contextmanager
def cluster(workdir: Path, partitions: int) -> Iterator[Cluster]:
    workdir.mkdir(parents=True, exist_ok=True)
    broker = start_broker(workdir / "kafka", timeout=180)
    running = Cluster(broker=broker, workdir=workdir, partitions=partitions)
    try:
        yield running
    finally:
        running.stop_all()
        broker.stop()


@dataclass
class FaustLoopProcess(WorkerProcess):
    """``faust -A bench.faust_loop worker``: the minimal Faust agent, run like the worker."""

    app: str = "bench.faust_loop"
    cwd: Path | None = REPO

    def stop(self, timeout: float = 5.0) -> None:
        # Under exactly_once Faust 0.15.3 can end its loop here on "IllegalOperation: Not in
        # the middle of a transaction" and then not exit: no need to wait 30 s for it.
        super().stop(timeout)


@dataclass
class BareLoopProcess:
    """``python -m bench.bare_loop``: the baseline consume-produce loop, in its own process."""

    bootstrap: str
    topic: str
    latency: float
    mode: str  # bare_loop.MODES
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> BareLoopProcess:
        group = f"bare-{uuid.uuid4().hex[:8]}"
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.bare_loop",
                    self.bootstrap,
                    self.topic,
                    group,
                    str(self.latency),
                    self.mode,
                ],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while "READY" not in self.log_path.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"bare loop did not start: {self.log_path.read_text()}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)


async def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    """Create the topics (existing ones are left alone) and wait until metadata shows them.

    Workers get their chat topics made here first: a worker that creates its own topic and
    subscribes at once can join its group before the topic is in the metadata, and then sits
    Ready with no partitions (seen here as "Ignoring missing topic" in its log).
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [name for name in names if name not in existing]
        if wanted:
            await admin.create_topics(
                [NewTopic(name, num_partitions=partitions, replication_factor=1) for name in wanted]
            )
        deadline = time.monotonic() + 60
        while set(names) - set(await admin.list_topics()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"topics {names} did not appear")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


# -- Process figures -----------------------------------------------------------------------------


def proc_status_kib(pid: int, field_name: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmHWM = peak RSS, VmRSS = current RSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def wait_http_ok(url: str, timeout: float) -> float | None:
    """Seconds until ``url`` answers 200, polled every 50 ms; None after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if http_get(url, timeout=2.0)[0] == 200:
            return time.monotonic() - started
        time.sleep(0.05)
    return None


# -- What the results were measured on -----------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "kernel": platform.release(),
    }


def versions(broker: LocalBroker | None) -> dict[str, str]:
    """Versions of what ran; Kafka's only when the run started a broker."""
    found = {"kafka": broker.installed_version() or "unknown"} if broker is not None else {}
    found["python"] = sys.version.split()[0]
    for package in ("faust-streaming", "aiokafka", "llama-cpp-python", "rocksdict", "hdrhistogram"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def write_json(path: Path, document: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
