"""Where the local broker listens and keeps its files: :class:`BrokerConfig`, its defaults and
the paths of the data files shipped with the package."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

KAFKA_VERSION = "4.1.1"
SCALA_VERSION = "2.13"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9092
NODE_ID = 1

# Data files of the local Kafka broker: the Maven POM of its jars and its log4j2 config.
PACKAGE_FILES = Path(__file__).resolve().parent / "resources"
POM = PACKAGE_FILES / "pom.xml"
LOG4J2_CONFIG = PACKAGE_FILES / "log4j2.xml"


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
