"""A local, single-node Apache Kafka broker (KRaft mode) for development and tests.

The broker is the real Apache Kafka server, run from its jars on the local Java runtime:

* ``ensure_jars`` fetches the jars once with Maven (the POM ships in ``marvin_faust/kafka``);
* ``start`` writes ``server.properties``, formats the storage the first time, launches
  ``java ... kafka.Kafka server.properties`` in a session of its own and returns once the broker
  answers a Metadata request with itself in it;
* ``stop`` sends SIGTERM to the broker's process group (SIGKILL after the timeout).

Everything lives in one home directory (``./.kafka`` unless ``MARVIN_KAFKA_HOME`` or ``--home``
says otherwise)::

    .kafka/lib/               the jars (MARVIN_KAFKA_JARS puts them elsewhere)
    .kafka/data/              the log dirs and the KRaft metadata
    .kafka/logs/server.log    the broker's log (log4j2, marvin_faust/kafka/log4j2.xml)
    .kafka/logs/console.log   the JVM's stdout and stderr
    .kafka/server.properties  written on each start
    .kafka/broker.pid         the pid of the running broker

From the shell: ``python -m marvin_faust.broker start|stop|status`` (also ``marvin-faust broker``).
This module needs only the standard library and click, so that it loads without Faust.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click

KAFKA_VERSION = "4.1.1"
SCALA_VERSION = "2.13"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9092
NODE_ID = 1

PACKAGE_FILES = Path(__file__).resolve().parent / "kafka"
POM = PACKAGE_FILES / "pom.xml"
LOG4J2_CONFIG = PACKAGE_FILES / "log4j2.xml"

# Written into the jars dir by ensure_jars once Maven has copied every jar.
JARS_MARKER = ".marvin-kafka-version"

JAVA_HINT = "install a Java 17 runtime (apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
MAVEN_HINT = "install Maven (apt-get install maven)"


class BrokerError(Exception):
    """The broker cannot be set up, started or stopped; the message says why, in one line."""


def default_home() -> Path:
    """``$MARVIN_KAFKA_HOME``, else ``./.kafka``."""
    env = os.environ.get("MARVIN_KAFKA_HOME")
    return Path(env) if env else Path.cwd() / ".kafka"


@dataclass(frozen=True)
class BrokerConfig:
    """Where the broker listens and keeps its files.

    ``controller_port`` defaults to ``port + 1`` and ``jars_dir`` to ``$MARVIN_KAFKA_JARS``,
    else ``home/lib``; several homes can share one jars dir.

    ``sasl_users`` (user -> password, a dict or pairs) adds a second client listener,
    SASL_PLAINTEXT with the PLAIN mechanism, on ``sasl_port`` (default ``port + 2``); the
    PLAINTEXT listener stays for the broker's own use and for the readiness check.
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    home: Path = field(default_factory=default_home)
    controller_port: int | None = None
    jars_dir: Path | None = None
    kafka_version: str = KAFKA_VERSION
    heap: str = "512m"
    sasl_users: tuple[tuple[str, str], ...] = ()
    sasl_port: int | None = None

    def __post_init__(self) -> None:
        users = self.sasl_users
        pairs = tuple(users.items()) if isinstance(users, dict) else tuple(users)
        object.__setattr__(self, "sasl_users", pairs)
        for user, _ in pairs:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", user):
                raise BrokerError(f"SASL user names are letters, digits, _ . - (got {user!r})")
        if self.sasl_port is None and pairs:
            object.__setattr__(self, "sasl_port", self.port + 2)
        home = Path(self.home).expanduser().absolute()
        object.__setattr__(self, "home", home)
        if self.controller_port is None:
            object.__setattr__(self, "controller_port", self.port + 1)
        if self.jars_dir is None:
            env = os.environ.get("MARVIN_KAFKA_JARS")
            object.__setattr__(self, "jars_dir", Path(env) if env else home / "lib")
        object.__setattr__(self, "jars_dir", Path(self.jars_dir).expanduser().absolute())
        for name in ("port", "controller_port", "sasl_port"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 65535:
                raise BrokerError(f"{name} must be between 1 and 65535 (got {value})")
        if self.port == self.controller_port:
            raise BrokerError(f"the broker and controller ports must differ (both {self.port})")
        if self.sasl_port is not None and self.sasl_port in (self.port, self.controller_port):
            raise BrokerError(f"the SASL port must differ from the others (got {self.sasl_port})")

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def log_file(self) -> Path:
        """The broker's own log (log4j2)."""
        return self.logs_dir / "server.log"

    @property
    def console_file(self) -> Path:
        """The JVM's stdout and stderr."""
        return self.logs_dir / "console.log"

    @property
    def pid_file(self) -> Path:
        return self.home / "broker.pid"

    @property
    def properties_file(self) -> Path:
        return self.home / "server.properties"

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def sasl_bootstrap_servers(self) -> str | None:
        """``host:sasl_port`` of the SASL_PLAINTEXT listener, if there is one."""
        return f"{self.host}:{self.sasl_port}" if self.sasl_users else None


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
        """The Kafka version whose jars are in the jars dir, if they are complete."""
        jars = self.config.jars_dir
        marker = jars / JARS_MARKER
        if marker.is_file():
            version = marker.read_text().strip()
            return version if (jars / f"kafka_{SCALA_VERSION}-{version}.jar").is_file() else None
        # A jars dir not made by us (e.g. a Kafka distribution's libs/): take it as it is.
        found = sorted(jars.glob(f"kafka_{SCALA_VERSION}-*.jar"))
        for jar in found:
            match = re.fullmatch(rf"kafka_{SCALA_VERSION}-(\d[\w.]*)\.jar", jar.name)
            if match:
                return match.group(1)
        return None

    def ensure_jars(self) -> Path:
        """Fetch Kafka's jars with Maven unless the jars dir already has them."""
        cfg = self.config
        jars = cfg.jars_dir
        installed = self.installed_version()
        if installed == cfg.kafka_version or (
            installed is not None and not (jars / JARS_MARKER).is_file()
        ):
            return jars
        if jars.is_dir() and any(jars.iterdir()) and not (jars / JARS_MARKER).is_file():
            raise BrokerError(
                f"{jars} has files but no Kafka jars: empty it or choose another jars dir"
            )
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError(f"Maven not found: {MAVEN_HINT} to fetch Kafka's jars into {jars}")
        find_java(min_major=8)  # Maven runs on it too; say so in our words rather than Maven's
        jars.parent.mkdir(parents=True, exist_ok=True)
        with _locked(jars.parent / f".{jars.name}.lock"):
            if self.installed_version() == cfg.kafka_version:  # fetched while we waited
                return jars
            self._progress(f"Fetching the jars of Kafka {cfg.kafka_version} with Maven...")
            staging = Path(tempfile.mkdtemp(prefix=f".{jars.name}-", dir=jars.parent))
            try:
                result = subprocess.run(
                    [
                        mvn,
                        "-q",
                        "-B",
                        "-Dstyle.color=never",
                        "-f",
                        str(POM),
                        "dependency:copy-dependencies",
                        f"-DoutputDirectory={staging}",
                        f"-Dkafka.version={cfg.kafka_version}",
                    ],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                )
                kafka_jar = staging / f"kafka_{SCALA_VERSION}-{cfg.kafka_version}.jar"
                if result.returncode != 0 or not kafka_jar.is_file():
                    raise BrokerError(
                        f"Maven could not fetch the jars of Kafka {cfg.kafka_version} "
                        f"(exit {result.returncode}): "
                        + _maven_error(result.stdout + result.stderr)
                    )
                (staging / JARS_MARKER).write_text(cfg.kafka_version + "\n")
                if jars.exists():  # ours, of another version
                    shutil.rmtree(jars)
                staging.rename(jars)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return jars

    # -- Start ------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> BrokerStatus:
        """Start the broker and wait until it answers a Metadata request.

        Raises :class:`BrokerError` if a broker already runs in this home, a port is taken,
        Java or Maven is missing, or the broker exits or does not answer within ``timeout``.
        """
        cfg = self.config
        cfg.home.mkdir(parents=True, exist_ok=True)
        with _locked(cfg.home / ".lock"):
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
        _write_atomic(cfg.pid_file, f"{self._process.pid}\n")
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


def find_java(min_major: int = 17) -> str:
    """The ``java`` to run: ``$MARVIN_JAVA``, ``$JAVA_HOME/bin/java`` or the one on PATH."""
    explicit = os.environ.get("MARVIN_JAVA")
    if explicit:
        java = shutil.which(explicit)
        if java is None:
            raise BrokerError(f"Java not found: MARVIN_JAVA={explicit} is not an executable")
    else:
        java_home = os.environ.get("JAVA_HOME")
        candidate = Path(java_home) / "bin" / "java" if java_home else None
        if candidate is not None and os.access(candidate, os.X_OK):
            java = str(candidate)
        else:
            java = shutil.which("java")
            if java is None:
                raise BrokerError(f"Java not found: {JAVA_HINT}")
    major = java_major_version(java)
    if major is not None and major < min_major:
        raise BrokerError(
            f"{java} is Java {major}; Kafka needs Java {min_major} or newer: {JAVA_HINT}"
        )
    return java


def java_major_version(java: str) -> int | None:
    """17 for ``openjdk version "17.0.15"``, 8 for ``"1.8.0_402"``; None if unknown."""
    try:
        result = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"Java at {java} does not run: {exc}") from None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


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


def metadata_brokers(host: str, port: int, timeout: float = 2.0) -> list[tuple[int, str, int]]:
    """Ask ``host:port`` for cluster metadata; its brokers as ``(node_id, host, port)``.

    Speaks the Kafka protocol directly: ApiVersions v0 (which every broker answers), then a
    Metadata request for no topics in a version both sides know (4 to 8).
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        body = _request(sock, api_key=18, version=0, correlation_id=1, body=b"")
        error, count = struct.unpack_from(">hi", body)
        if error:
            raise ValueError(f"ApiVersions error {error}")
        versions = {}
        for index in range(count):
            key, low, high = struct.unpack_from(">hhh", body, 6 + 6 * index)
            versions[key] = (low, high)
        low, high = versions.get(3, (0, -1))
        version = min(high, 8)
        if version < max(low, 4):
            raise ValueError(f"no common Metadata version (broker has {low}-{high})")
        request = struct.pack(">ib", 0, 0)  # no topics; do not create any
        if version >= 8:
            request += struct.pack(">bb", 0, 0)  # no authorized operations
        body = _request(sock, api_key=3, version=version, correlation_id=2, body=request)
    offset = 4  # throttle_time_ms
    (count,) = struct.unpack_from(">i", body, offset)
    offset += 4
    brokers = []
    for _ in range(count):
        node_id, length = struct.unpack_from(">ih", body, offset)
        offset += 6
        broker_host = body[offset : offset + length].decode()
        offset += length
        broker_port, rack_length = struct.unpack_from(">ih", body, offset)
        offset += 6 + max(rack_length, 0)
        brokers.append((node_id, broker_host, broker_port))
    return brokers


def _request(sock: socket.socket, api_key: int, version: int, correlation_id: int, body: bytes):
    client_id = b"marvin-faust-broker"
    message = (
        struct.pack(">hhih", api_key, version, correlation_id, len(client_id)) + client_id + body
    )
    sock.sendall(struct.pack(">i", len(message)) + message)
    (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
    response = _recv_exactly(sock, size)
    (answered,) = struct.unpack_from(">i", response)
    if answered != correlation_id:
        raise ValueError(f"answer to request {answered}, expected {correlation_id}")
    return response[4:]


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        data += chunk
    return bytes(data)


def _maven_error(output: str) -> str:
    """The first line of Maven's output that says what went wrong."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in output.splitlines()]
    errors = [line for line in lines if line.startswith("[ERROR]") and line != "[ERROR]"]
    return (errors or [line for line in lines if line] or ["no output"])[0]


def _jaas_quote(value: str) -> str:
    """A JAAS option value inside double quotes."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _escape_property(value: str) -> str:
    return value.replace("\\", "\\\\")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- Command line -----------------------------------------------------------------------------

home_option = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="MARVIN_KAFKA_HOME",
    default=None,
    help="Broker home: jars, data, logs, pid file. [default: ./.kafka; env MARVIN_KAFKA_HOME]",
)


def _broker(home: Path | None, **settings) -> LocalBroker:
    try:
        config = BrokerConfig(home=home or default_home(), **settings)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    return LocalBroker(config, progress=lambda message: click.echo(message, err=True))


@click.group(help="A local single-node Apache Kafka broker for development and tests.")
def cli() -> None:
    pass


@cli.command(help="Start the broker and wait until it answers.")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on.")
@click.option(
    "--controller-port", type=click.IntRange(1, 65535), default=None, help="[default: port + 1]"
)
@home_option
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait.")
def start(
    port: int, host: str, controller_port: int | None, home: Path | None, timeout: float
) -> None:
    broker = _broker(home, host=host, port=port, controller_port=controller_port)
    began = time.monotonic()
    try:
        status = broker.start(timeout=timeout)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"Kafka {status.kafka_version} broker running on {status.bootstrap_servers} "
        f"(pid {status.pid}, ready in {time.monotonic() - began:.1f} s, "
        f"log {broker.config.log_file})"
    )


@cli.command(help="Stop the broker (SIGTERM, then SIGKILL after the timeout).")
@home_option
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait.")
def stop(home: Path | None, timeout: float) -> None:
    broker = _broker(home)
    before = broker.status()
    try:
        stopped = broker.stop(timeout=timeout)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    if stopped:
        click.echo(f"stopped the broker on {before.bootstrap_servers} (pid {before.pid})")
    else:
        click.echo(f"no broker running (home {broker.config.home})")


@cli.command(help="Say whether the broker runs, with its pid and address.")
@home_option
def status(home: Path | None) -> None:
    click.echo(str(_broker(home).status()))


if __name__ == "__main__":
    cli()
