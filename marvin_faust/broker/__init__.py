"""A local, single-node Apache Kafka broker (KRaft mode) for development and tests.

The broker is the real Apache Kafka server, run from its jars on the local Java runtime:

* ``ensure_jars`` fetches the jars once with Maven (the POM ships in
  ``marvin_faust/broker/resources``);
* ``start`` writes ``server.properties``, formats the storage the first time, launches
  ``java ... kafka.Kafka server.properties`` in a session of its own and returns once the broker
  answers a Metadata request with itself in it;
* ``stop`` sends SIGTERM to the broker's process group (SIGKILL after the timeout).

Everything lives in one home directory (``./.kafka`` unless ``MARVIN_KAFKA_HOME`` or ``--home``
says otherwise)::

    .kafka/lib/               the jars (MARVIN_KAFKA_JARS puts them elsewhere)
    .kafka/data/              the log dirs and the KRaft metadata
    .kafka/logs/server.log    the broker's log (log4j2, marvin_faust/broker/resources/log4j2.xml)
    .kafka/logs/console.log   the JVM's stdout and stderr
    .kafka/server.properties  written on each start
    .kafka/broker.pid         the pid of the running broker

The modules: ``config`` (:class:`BrokerConfig`, defaults, the resource paths), ``java`` (finding
Java), ``jars`` (the Maven fetch), ``process`` (:class:`LocalBroker`: start, stop, status),
``probe`` (a Metadata request over a socket), ``files`` (lock and atomic write) and ``cli``.

From the shell: ``python -m marvin_faust.broker start|stop|status`` (also ``marvin-faust broker``).
This package needs only the standard library and click, so that it loads without Faust; it does
not import ``marvin_faust.app`` or ``marvin_faust.settings``.
"""

from __future__ import annotations

from .cli import cli
from .config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    KAFKA_VERSION,
    LOG4J2_CONFIG,
    NODE_ID,
    PACKAGE_FILES,
    POM,
    SCALA_VERSION,
    BrokerConfig,
    BrokerError,
    default_home,
)
from .jars import JARS_MARKER, MAVEN_HINT
from .java import JAVA_HINT, find_java, java_major_version
from .probe import metadata_brokers
from .process import BrokerStatus, LocalBroker, new_cluster_id, port_is_free

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "JARS_MARKER",
    "JAVA_HINT",
    "KAFKA_VERSION",
    "LOG4J2_CONFIG",
    "MAVEN_HINT",
    "NODE_ID",
    "PACKAGE_FILES",
    "POM",
    "SCALA_VERSION",
    "BrokerConfig",
    "BrokerError",
    "BrokerStatus",
    "LocalBroker",
    "cli",
    "default_home",
    "find_java",
    "java_major_version",
    "metadata_brokers",
    "new_cluster_id",
    "port_is_free",
]
