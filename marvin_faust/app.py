"""The Faust app: :func:`create_app` builds it from explicit settings.

``faust -A marvin_faust worker -l info`` (also ``marvin-faust worker``, ``python -m marvin_faust
worker``) asks the package for its ``app``; :func:`current_app` then builds it once from the
environment and the command line. Importing any module of the package builds nothing: settings
are read, Faust fixed and the model backend made only here.
"""

from __future__ import annotations

import logging
import shutil
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import faust
from faust.sensors.prometheus import setup_prometheus_sensors
from faust.types import AgentT
from mode import Service

from . import faust_fixes
from .agents import declare_agent
from .commands import declare_commands
from .lifecycle import Lifecycle
from .llm import ChatBackend, ModelLoadError, create_backend
from .metrics import Metrics
from .partitioners import partitioner_named
from .security import CredentialsCheck, broker_credentials
from .settings import Settings, SettingsError, load_settings, unguarded_bind_problem
from .streaming import StreamPublisher
from .tables import HistoryTable, declare_history
from .topics import Topics, declare_topics
from .transactions import CommitBarrier
from .views import declare_views

log = logging.getLogger(__name__)

# Seconds of slack on top of the model timeout before Faust calls an event stuck.
PROCESSING_SLACK = 60.0

# How often the consumer refreshes its metadata (Faust's default: 5 minutes). A worker that
# creates the chat topic can join its group before the topic is in the broker's metadata; the
# assignor then ignores the topic and the worker sits Ready with no partitions until the next
# refresh (seen in tests: nothing answered for 4 minutes). The refresh shows the topic and
# triggers a rebalance.
METADATA_MAX_AGE_MS = 10_000


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
    """faust.App on the fixed transport (``faust_fixes``) that only trusts local table state
    left by a clean shutdown. Its parts: ``settings``, ``backend``, ``chat_topics``, ``history``,
    ``lifecycle`` (expiry and deletion), ``answer`` (the agent), ``metrics``, ``commit_barrier``,
    ``stream_publisher`` (None when streaming is off)."""

    chat_topics: Topics
    history: HistoryTable
    lifecycle: Lifecycle
    answer: AgentT

    def __init__(self, settings: Settings, backend: ChatBackend) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = Metrics()
        self.commit_barrier = CommitBarrier()
        topic = settings.streams_to
        self.stream_publisher = StreamPublisher(settings, topic) if topic else None
        super().__init__(settings.app_id, **faust_options(settings))

    def _new_transport(self) -> faust_fixes.Transport:
        return faust_fixes.Transport(
            self.conf.broker_consumer, self, disabled=self.settings.faust_fixes_disabled
        )

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


def faust_options(settings: Settings) -> dict[str, Any]:
    """Faust's settings, from ours: the one source of truth for both."""
    stuck_after = settings.model_timeout + PROCESSING_SLACK
    return {
        "broker": settings.broker,
        "store": settings.store,
        "datadir": str(settings.data_dir),
        # Everything is declared by create_app: nothing to scan for.
        "autodiscover": False,
        # Faust's table manager on the fixed table recovery (faust_fixes, fix 9).
        "TableManager": faust_fixes.TableManager,
        "origin": "marvin_faust",
        "topic_partitions": settings.partitions,
        # Keys placed as the fleet's producers place them, so table_route finds a conversation
        # on the partition its messages really land on.
        "producer_partitioner": partitioner_named(settings.partitioner),
        "processing_guarantee": settings.processing_guarantee,
        # Under exactly_once a reply is visible to read_committed consumers only once its
        # transaction commits: commit often, or every reply waits for Faust's 2.8 s default.
        "broker_commit_interval": settings.commit_interval,
        # Heartbeats come from a background thread, so slow replies do not count against this;
        # a worker killed with -9 holds its partitions for this long (Faust's default is 60 s).
        "broker_session_timeout": settings.session_timeout,
        "broker_credentials": broker_credentials(settings),
        # A rebalance hands a partition to a worker that already holds a copy of its history.
        "table_standby_replicas": settings.standby_replicas,
        "web_bind": settings.web_bind,
        "web_port": settings.web_port,
        # The URL other workers use to reach this one (table_route); the bind address unless
        # it is a wildcard.
        "web_host": socket.gethostname()
        if settings.web_bind in ("0.0.0.0", "::")
        else settings.web_bind,
        # /table/... would serve every conversation with no authentication, /router/... every
        # worker's URL and partitions. table_route does not need /router/: it finds a key's
        # worker in the local assignor and forwards the request there.
        "web_tables_enabled": False,
        "web_router_enabled": False,
        # One event takes seconds: fetch few records at a time and only call an event stuck
        # well after the model would have timed out.
        "broker_max_poll_records": settings.max_poll_records,
        "consumer_metadata_max_age_ms": METADATA_MAX_AGE_MS,
        "stream_processing_timeout": stuck_after,
        "broker_commit_livelock_soft_timeout": stuck_after,
    }


class ModelLoader(Service):
    """Loads the model when the worker starts, in a thread; a failure stops the start."""

    def __init__(self, backend: ChatBackend, **kwargs: Any) -> None:
        self.backend = backend
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        log.info("Loading the %s model backend", self.backend.name)
        try:
            await self.backend.start()
        except ModelLoadError as exc:
            log.error("marvin-faust: cannot start: %s", exc)
            print(f"marvin-faust: cannot start: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(3) from None
        log.info("Model backend %s loaded", self.backend.name)


def create_app(settings: Settings, backend: ChatBackend | None = None) -> MarvinApp:
    """The worker's app: topics, history table, agent, views and commands, on the Faust fixes.

    Raises ``faust_fixes.FaustVersionError`` on a faust-streaming the fixes were not verified
    on. ``backend`` defaults to the one the settings name (not loaded until the worker starts).
    """
    faust_fixes.check_faust_version()
    app = MarvinApp(settings, backend or create_backend(settings))
    app.chat_topics = declare_topics(app, settings)
    app.history = declare_history(app, settings)
    app.lifecycle = declare_lifecycle(app)
    app.answer = declare_agent(app)
    declare_views(app)
    declare_commands(app)
    # Started before Faust's own Kafka clients: rejected credentials stop the start with one line.
    app.add_dependency(CredentialsCheck(settings))
    app.add_dependency(ModelLoader(app.backend))
    if app.stream_publisher is not None:
        app.add_dependency(app.stream_publisher)
    app.add_dependency(app.lifecycle)
    # Faust's own sensor metrics and ours, in one registry served at /metrics.
    setup_prometheus_sensors(
        app, pattern="/metrics", registry=app.metrics.registry, name_prefix="faust"
    )
    return app


def declare_lifecycle(app: MarvinApp) -> Lifecycle:
    """Expiry and deletion (``marvin_faust.lifecycle``): the index follows the partitions the
    worker owns after each recovery; the sweep runs only with a TTL."""
    lifecycle = Lifecycle(app)
    app.history.on_recover(lifecycle.on_recovered)
    if app.settings.conversation_ttl > 0:
        app.timer(interval=app.settings.expiry_interval, name="marvin_faust.expire")(
            lifecycle.sweep
        )
    return lifecycle


# Faust's options before the command that take a value (faust/cli/base.py).
_GLOBAL_OPTIONS_WITH_VALUE = frozenset(
    {"--app", "-A", "--workdir", "-W", "--datadir", "-D", "--loop", "-L"}
    | {"--logfile", "-f", "--loglevel", "-l", "--blocking-timeout", "--console-port"}
)

# Options of a command that are also settings, by command; ``--datadir``/``-D`` anywhere.
_COMMAND_OPTIONS = {
    "worker": {
        "--web-port": "web_port",
        "-p": "web_port",
        "--web-bind": "web_bind",
        "-b": "web_bind",
    },
    "webchat": {"--port": "webchat_port", "--bind": "webchat_bind"},
}
_GLOBAL_OPTIONS = {"--datadir": "data_dir", "-D": "data_dir"}

# The setting that holds the address a command serves HTTP on.
SERVED_ADDRESS = {"worker": "web_bind", "webchat": "webchat_bind"}


def cli_command(argv: Sequence[str]) -> tuple[int, str]:
    """The command of ``argv`` (``worker``, ``webchat``, ``chat``...) and where it is: the first
    argument that is neither one of Faust's options nor an option's value; ``(len(argv), "")``
    when there is none."""
    value_next = False
    for index, arg in enumerate(argv[1:], start=1):
        if value_next:
            value_next = False
        elif arg.startswith("-"):
            value_next = "=" not in arg and arg in _GLOBAL_OPTIONS_WITH_VALUE
        else:
            return index, arg
    return len(argv), ""


def cli_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """Command-line options that are also settings: Faust's ``--datadir``/``-D`` before the
    command, ``--web-port``/``-p`` and ``--web-bind``/``-b`` after ``worker``, ``--port`` and
    ``--bind`` after ``webchat``. They win over ``MARVIN_*`` variables, as a command line does.

    Faust builds the app before it applies its own options (and never applies ``--datadir`` to
    an app with a data dir of its own), so they are read here, the way Faust finds ``-A``.
    """
    at, command = cli_command(argv)
    found: dict[str, Any] = {}
    for index, arg in enumerate(argv[1:], start=1):
        known = _GLOBAL_OPTIONS
        if index > at:
            known = {**_GLOBAL_OPTIONS, **_COMMAND_OPTIONS.get(command, {})}
        option, equals, inline = arg.partition("=")
        if option in known:
            value = inline if equals else (argv[index + 1] if index + 1 < len(argv) else None)
            if value is not None:
                found[known[option]] = value
    return found


def command_settings(argv: Sequence[str]) -> Settings:
    """The settings of the command line ``argv``: the environment, then its options.

    A command that serves HTTP (a worker, the web chat) on a non-loopback address needs
    ``MARVIN_API_TOKEN`` (or ``MARVIN_ALLOW_UNAUTHENTICATED``); without, it is a bad setting.
    Raises :class:`SettingsError`.
    """
    settings = load_settings(**cli_overrides(argv))
    served = SERVED_ADDRESS.get(cli_command(argv)[1])
    problem = unguarded_bind_problem(settings, served) if served else None
    if problem is not None:
        raise SettingsError(f"invalid settings: {problem}")
    return settings


_current: MarvinApp | None = None


def current_app() -> MarvinApp:
    """This process's worker app, built on first use from the environment and command line.
    A bad setting or Faust version stops the process with one line that says which."""
    global _current
    if _current is None:
        try:
            _current = create_app(command_settings(sys.argv))
        except (SettingsError, faust_fixes.FaustVersionError) as exc:
            print(f"marvin-faust: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        # Importing this module bound the package's ``app`` to it; Faust looks up
        # ``marvin_faust.app`` more than once and must find the app every time.
        sys.modules[__package__].app = _current  # type: ignore[attr-defined]
    return _current


def main() -> NoReturn:
    """The ``marvin-faust`` command: Faust's CLI bound to this app."""
    current_app().main()
