"""The Faust app, its settings and its model backend: one of each per process.

Run with ``faust -A marvin_faust worker -l info``, ``marvin-faust worker`` or
``python -m marvin_faust worker``.
"""

from __future__ import annotations

import logging
import shutil
import socket
import sys
from pathlib import Path
from typing import NoReturn

import faust
from faust.sensors.prometheus import setup_prometheus_sensors
from mode import Service

from . import patches
from .llm import ChatBackend, ModelLoadError, create_backend
from .metrics import REGISTRY
from .partitioners import partitioner_named
from .security import CredentialsCheck, broker_credentials
from .settings import Settings, SettingsError, load_settings

log = logging.getLogger(__name__)

# Seconds of slack on top of the model timeout before Faust calls an event stuck.
PROCESSING_SLACK = 60.0

# How often the consumer refreshes its metadata (Faust's default: 5 minutes). A worker that
# creates the chat topic can join its group before the topic is in the broker's metadata; the
# assignor then ignores the topic and the worker sits Ready with no partitions until the next
# refresh (seen in tests: nothing answered for 4 minutes). The refresh shows the topic and
# triggers a rebalance.
METADATA_MAX_AGE_MS = 10_000


def _settings_or_exit() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        print(f"marvin-faust: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


CLEAN_SHUTDOWN_MARKER = ".clean-shutdown"


def discard_unclean_state(tabledir: Path) -> bool:
    """Drop the local table state unless the last worker here stopped cleanly.

    RocksDB applies a table write at once, before its transaction commits. After a crash the
    local state can hold turns whose replies were never committed; the agent would then skip
    those messages as already answered and lose them. The changelog is the truth: without a
    clean-shutdown marker, recover everything from it. Returns whether state was dropped.
    """
    marker = tabledir / CLEAN_SHUTDOWN_MARKER
    if marker.exists():
        marker.unlink()  # a crash during this run must be detected next time
        return False
    if not tabledir.is_dir() or not any(tabledir.iterdir()):
        return False
    for entry in tabledir.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return True


class MarvinApp(faust.App):
    """faust.App that only trusts local table state left by a clean shutdown, on a transport
    whose transactions hold what each event sends (``patches.Transport``)."""

    def _new_transport(self) -> patches.Transport:
        return patches.Transport(self.conf.broker_consumer, self)

    def _crash(self, reason: BaseException) -> None:
        # Faust stops the worker after a fatal error (a fenced producer, a crashed consumer)
        # under a heap of tracebacks: say in one line what happened and what follows.
        if not self.crashed:
            log.critical(
                "marvin-faust: fatal error, the worker exits non-zero so that its supervisor "
                "restarts it: %s: %s",
                type(reason).__name__,
                reason,
            )
        super()._crash(reason)

    async def on_first_start(self) -> None:
        await super().on_first_start()
        if discard_unclean_state(Path(self.conf.tabledir)):
            log.warning(
                "The last worker in %s did not stop cleanly: local table state dropped, "
                "rebuilding it from the changelog",
                self.conf.tabledir,
            )

    async def on_shutdown(self) -> None:
        await super().on_shutdown()
        # Every child (tables included) has stopped. A consumer that crashed on the way (seen:
        # Faust's last exactly_once commit failing with "Not in the middle of a transaction")
        # leaves an aborted transaction behind: then the stop was not clean.
        if self.crashed or self.consumer.crashed:
            log.warning("Stopped after a crash: the next start rebuilds the tables")
            return
        tabledir = Path(self.conf.tabledir)
        if tabledir.is_dir():
            (tabledir / CLEAN_SHUTDOWN_MARKER).touch()


def create_app(settings: Settings) -> faust.App:
    stuck_after = settings.model_timeout + PROCESSING_SLACK
    return MarvinApp(
        settings.app_id,
        broker=settings.broker,
        store=settings.store,
        datadir=str(settings.data_dir),
        autodiscover=True,
        origin="marvin_faust",
        topic_partitions=settings.partitions,
        # Keys placed as the fleet's producers place them, so table_route finds a conversation
        # on the partition its messages really land on.
        producer_partitioner=partitioner_named(settings.partitioner),
        processing_guarantee=settings.processing_guarantee,
        # Under exactly_once a reply is visible to read_committed consumers only once its
        # transaction commits: commit often, or every reply waits for Faust's 2.8 s default.
        broker_commit_interval=settings.commit_interval,
        # Heartbeats come from a background thread, so slow replies do not count against this;
        # a worker killed with -9 holds its partitions for this long (Faust's default is 60 s).
        broker_session_timeout=settings.session_timeout,
        broker_credentials=broker_credentials(settings),
        # A rebalance hands a partition to a worker that already holds a copy of its history.
        table_standby_replicas=settings.standby_replicas,
        web_bind=settings.web_bind,
        web_port=settings.web_port,
        # The URL other workers use to reach this one (table_route); the bind address unless
        # it is a wildcard.
        web_host=socket.gethostname()
        if settings.web_bind in ("0.0.0.0", "::")
        else (settings.web_bind),
        # /table/... would serve every conversation with no authentication.
        web_tables_enabled=False,
        # One event takes seconds: fetch few records at a time and only call an event stuck
        # well after the model would have timed out.
        broker_max_poll_records=settings.max_poll_records,
        consumer_metadata_max_age_ms=METADATA_MAX_AGE_MS,
        stream_processing_timeout=stuck_after,
        broker_commit_livelock_soft_timeout=stuck_after,
    )


settings = _settings_or_exit()
# Before the worker starts: Faust's exactly_once recovery after a rebalance (patches.py).
patches.apply()
app = create_app(settings)
# Started before Faust's own Kafka clients: rejected credentials stop the start with one line.
app.add_dependency(CredentialsCheck(settings))
# Faust's own sensor metrics and ours, in one registry served at /metrics.
setup_prometheus_sensors(app, pattern="/metrics", registry=REGISTRY, name_prefix="faust")
backend: ChatBackend = create_backend(settings)


@app.service
class ModelLoader(Service):
    """Loads the model when the worker starts, in a thread; a failure stops the start."""

    async def on_start(self) -> None:
        log.info("Loading the %s model backend", backend.name)
        try:
            await backend.start()
        except ModelLoadError as exc:
            log.error("marvin-faust: cannot start: %s", exc)
            print(f"marvin-faust: cannot start: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(3) from None
        log.info("Model backend %s loaded", backend.name)


def main() -> NoReturn:
    """The ``marvin-faust`` command: Faust's CLI bound to this app."""
    app.main()
