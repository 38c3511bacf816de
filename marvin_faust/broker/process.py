"""The lifecycle of one local broker: start (properties, storage format, launch, readiness),
stop (SIGTERM, then SIGKILL) and status, all in one home directory."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import jars
from .config import LOG4J2_CONFIG, NODE_ID, BrokerConfig, BrokerError
from .files import locked, write_atomic
from .java import find_java
from .probe import metadata_brokers


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    home: Path
    pid: int | None = None
    bootstrap_servers: str | None = None
    kafka_version: str | None = None

    def __str__(self) -> str:
        if not self.running:
            return f"stopped (home {self.home})"
        version = f"Kafka {self.kafka_version}, " if self.kafka_version else ""
        return f"running on {self.bootstrap_servers} (pid {self.pid}, {version}home {self.home})"


class LocalBroker:
    """One single-node Kafka broker (combined broker and controller) in ``config.home``."""

    def __init__(
        self, config: BrokerConfig | None = None, progress: Callable[[str], None] | None = None
    ) -> None:
        self.config = config or BrokerConfig()
        self._progress = progress or (lambda message: None)
        self._process: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"LocalBroker({self.bootstrap_servers}, home={self.config.home})"

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for Kafka clients (Faust: ``"kafka://" + bootstrap_servers``)."""
        return self.config.bootstrap_servers

    @property
    def pid(self) -> int | None:
        """The pid of this home's running broker, if any."""
        pid = self._read_pid()
        return pid if pid is not None and self._alive(pid) else None

    # -- Jars -------------------------------------------------------------------------------

    def jars_ready(self) -> bool:
        return self.installed_version() is not None

    def installed_version(self) -> str | None:
        """:func:`marvin_faust.broker.jars.installed_version` of this config's jars dir."""
        return jars.installed_version(self.config.jars_dir)

    def ensure_jars(self) -> Path:
        """:func:`marvin_faust.broker.jars.ensure_jars` for this config, with its progress."""
        return jars.ensure_jars(self.config, self._progress)

    # -- Start ------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> BrokerStatus:
        """Start the broker and wait until it answers a Metadata request.

        Raises :class:`BrokerError` if a broker already runs in this home, a port is taken,
        Java or Maven is missing, or the broker exits or does not answer within ``timeout``.
        """
        cfg = self.config
        cfg.home.mkdir(parents=True, exist_ok=True)
        with locked(cfg.home / ".lock"):
            running = self.status()
            if running.running:
                raise BrokerError(
                    f"a Kafka broker is already running on {running.bootstrap_servers} "
                    f"(pid {running.pid}) in {cfg.home}: stop it first"
                )
            cfg.pid_file.unlink(missing_ok=True)  # stale
            java = find_java(min_major=17 if int(cfg.kafka_version.split(".")[0]) >= 4 else 11)
            ports = [(cfg.port, "broker"), (cfg.controller_port, "controller")]
            if cfg.sasl_users:
                ports.append((cfg.sasl_port, "SASL"))
            for port, role in ports:
                if not port_is_free(cfg.host, port):
                    raise BrokerError(
                        f"port {port} on {cfg.host} (the {role} port) is already in use "
                        "by another program: stop it or choose another --port"
                    )
            self.ensure_jars()
            cfg.data_dir.mkdir(parents=True, exist_ok=True)
            cfg.logs_dir.mkdir(parents=True, exist_ok=True)
            self._write_properties()
            if not (cfg.data_dir / "meta.properties").is_file():
                self._format(java)
            self._launch(java)
        self._wait_until_ready(timeout)
        return self.status()

    def _java_command(self, java: str, heap: str) -> list[str]:
        cfg = self.config
        return [
            java,
            f"-Xmx{heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
            f"-Dkafka.logs.dir={cfg.logs_dir}",
            "-cp",
            f"{cfg.jars_dir}/*",
        ]

    def _write_properties(self) -> None:
        cfg = self.config
        listener = f"PLAINTEXT://{cfg.host}:{cfg.port}"
        controller = f"{cfg.host}:{cfg.controller_port}"
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(NODE_ID),
            # A static quorum of one: its address comes from this file on every start, so the
            # same home can be started again on other ports.
            "controller.quorum.voters": f"{NODE_ID}@{controller}",
            "listeners": f"{listener},CONTROLLER://{controller}",
            "advertised.listeners": listener,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(cfg.data_dir),
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            # One broker: every replication factor and min ISR is 1.
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
        }
        if int(cfg.kafka_version.split(".")[0]) >= 4:
            settings["share.coordinator.state.topic.replication.factor"] = "1"
            settings["share.coordinator.state.topic.min.isr"] = "1"
        if cfg.sasl_users:
            settings.update(self._sasl_properties())
        lines = ["# Written by marvin_faust.broker on each start: edits here are overwritten."]
        lines += [f"{key}={_escape_property(value)}" for key, value in settings.items()]
        cfg.properties_file.write_text("\n".join(lines) + "\n")

    def _sasl_properties(self) -> dict[str, str]:
        """A SASL_PLAINTEXT listener with PLAIN users, beside the PLAINTEXT one."""
        cfg = self.config
        plain = f"PLAINTEXT://{cfg.host}:{cfg.port}"
        sasl = f"SASL_PLAINTEXT://{cfg.host}:{cfg.sasl_port}"
        users = " ".join(
            f'user_{user}="{_jaas_quote(password)}"' for user, password in cfg.sasl_users
        )
        return {
            "listeners": f"{plain},{sasl},CONTROLLER://{cfg.host}:{cfg.controller_port}",
            "advertised.listeners": f"{plain},{sasl}",
            "listener.security.protocol.map": (
                "PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT"
            ),
            "sasl.enabled.mechanisms": "PLAIN",
            # The broker's user list; no username/password: the brokers talk over PLAINTEXT.
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": (
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
            ),
        }

    def _format(self, java: str) -> None:
        cfg = self.config
        cluster_id = new_cluster_id()
        self._progress(f"Formatting the broker's storage in {cfg.data_dir} (cluster {cluster_id})")
        command = [
            *self._java_command(java, "256m"),
            "-XX:TieredStopAtLevel=1",
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(cfg.properties_file),
        ]
        try:
            result = subprocess.run(
                command,
                cwd=cfg.home,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
            )
        except subprocess.TimeoutExpired:
            raise BrokerError(f"formatting {cfg.data_dir} took over 120 s") from None
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip().splitlines()
            raise BrokerError(
                f"formatting {cfg.data_dir} failed (exit {result.returncode}): "
                + (output[-1] if output else "no output")
            )

    def _launch(self, java: str) -> None:
        cfg = self.config
        command = [*self._java_command(java, cfg.heap), "kafka.Kafka", str(cfg.properties_file)]
        with cfg.console_file.open("ab") as console:
            console.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} start\n".encode())
            console.flush()
            self._process = subprocess.Popen(
                command,
                cwd=cfg.home,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        write_atomic(cfg.pid_file, f"{self._process.pid}\n")
        self._progress(f"Started the broker (pid {self._process.pid}), waiting for it to answer")

    def _wait_until_ready(self, timeout: float) -> None:
        cfg = self.config
        process = self._process
        assert process is not None
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while True:
            if process.poll() is not None:
                self._forget()
                raise BrokerError(
                    f"the broker exited during start (exit {process.returncode}); "
                    f"see {cfg.log_file}\n{self.log_tail()}"
                )
            try:
                brokers = metadata_brokers(cfg.host, cfg.port, timeout=2.0)
                if brokers:
                    return
                last_error = "Metadata lists no broker yet"
            except (OSError, ValueError) as exc:
                last_error = str(exc) or type(exc).__name__
            if time.monotonic() >= deadline:
                self.stop()
                raise BrokerError(
                    f"the broker did not answer on {cfg.bootstrap_servers} within {timeout:g} s "
                    f"({last_error}); see {cfg.log_file}\n{self.log_tail()}"
                )
            time.sleep(0.2)

    # -- Stop and status --------------------------------------------------------------------

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop this home's broker; False if none was running. No process is left behind."""
        pid = self._read_pid()
        if pid is None or not self._alive(pid):
            self._forget()
            return False
        self._signal(pid, signal.SIGTERM)
        if not self._wait_gone(pid, timeout):
            self._signal(pid, signal.SIGKILL)
            if not self._wait_gone(pid, 10.0):
                raise BrokerError(f"the broker (pid {pid}) survived SIGKILL")
        self._forget()
        return True

    def status(self) -> BrokerStatus:
        cfg = self.config
        pid = self.pid
        if pid is None:
            return BrokerStatus(running=False, home=cfg.home)
        return BrokerStatus(
            running=True,
            home=cfg.home,
            pid=pid,
            bootstrap_servers=self._running_address() or cfg.bootstrap_servers,
            kafka_version=self.installed_version(),
        )

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the broker's log and of the JVM's console output."""
        parts = []
        for path in (self.config.log_file, self.config.console_file):
            if path.is_file():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                if text:
                    parts.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(parts) or "(no broker log yet)"

    def _read_pid(self) -> int | None:
        try:
            return int(self.config.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _alive(self, pid: int) -> bool:
        """Whether ``pid`` is a live (not zombie) broker process of this home."""
        if self._process is not None and self._process.pid == pid:
            return self._process.poll() is None
        proc = Path("/proc") / str(pid)
        if Path("/proc/self").is_dir():
            try:
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError):
                return False
            return (
                state not in ("Z", "X")
                and b"kafka.Kafka" in cmdline
                and str(self.config.properties_file).encode() in cmdline
            )
        try:  # no /proc (macOS): a live pid from our pid file will do
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _signal(self, pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            try:
                same_group = os.getpgid(pid) == pid
            except ProcessLookupError:
                return
            if same_group:
                os.killpg(pid, signum)
            else:
                os.kill(pid, signum)

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        if self._process is not None and self._process.pid == pid:
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while self._alive(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def _forget(self) -> None:
        self.config.pid_file.unlink(missing_ok=True)
        if self._process is not None and self._process.poll() is not None:
            self._process = None

    def _running_address(self) -> str | None:
        """The PLAINTEXT address in the properties the running broker was started with."""
        try:
            text = self.config.properties_file.read_text()
        except OSError:
            return None
        match = re.search(r"^advertised\.listeners=PLAINTEXT://(\S+?)(?:,|$)", text, re.M)
        return match.group(1) if match else None


# -- Helpers --------------------------------------------------------------------------------


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (as Kafka binds: SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID in URL-safe base64, 22 characters.

    Never one that starts with ``-`` (1 in 64 would): the storage tool would read it as an
    option. Kafka's own ``Uuid.randomUuid`` avoids those too.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _jaas_quote(value: str) -> str:
    """A JAAS option value inside double quotes."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _escape_property(value: str) -> str:
    return value.replace("\\", "\\\\")
