"""Processes started the way a user starts them, and the processes left on the machine.

- :class:`WorkerProcess`: one ``faust -A marvin_faust worker -l info`` (or another Faust app),
  in a session of its own, its output in a log file, ready at :data:`READY_LINE`;
- :func:`say`: one ``marvin-faust say`` run;
- :func:`live_processes`: the live processes of this machine, read from /proc, for checks that
  nothing is left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from marvin_faust.settings import Settings, load_settings

from .ports import free_ports

READY_LINE = "[^Worker]: Ready"
# The console scripts of the running interpreter's environment.
FAUST = str(Path(sys.executable).parent / "faust")
MARVIN = str(Path(sys.executable).parent / "marvin-faust")


def stop_group(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM to the process group of ``process`` (a session leader); SIGKILL after
    ``timeout`` s. Nothing if it has already ended."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _free_port() -> int:
    return free_ports(1)[0]


@dataclass
class WorkerProcess:
    """One ``faust -A <app> worker -l info`` process with its own web port and data dir.

    ``app`` is ``marvin_faust`` unless told otherwise (any Faust app module, run from ``cwd``).
    The data dir and web port go in ``MARVIN_DATA_DIR`` and ``MARVIN_WEB_PORT``, or, with
    ``faust_options``, as Faust's own options (``--datadir``, ``--web-port``).
    """

    env: dict[str, str]
    data_dir: Path
    log_path: Path
    web_port: int = field(default_factory=_free_port)
    process: subprocess.Popen | None = None
    # Data dir and web port as Faust's own options (--datadir, --web-port), not MARVIN_*.
    faust_options: bool = False
    app: str = "marvin_faust"
    cwd: Path | None = None

    def start(self, timeout: float = 90.0) -> WorkerProcess:
        env = {**os.environ, **self.env}
        before, after = [], []
        if self.faust_options:
            before = ["--datadir", str(self.data_dir)]
            after = ["--web-port", str(self.web_port)]
        else:
            env.update(MARVIN_DATA_DIR=str(self.data_dir), MARVIN_WEB_PORT=str(self.web_port))
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                [FAUST, "-A", self.app, *before, "worker", "-l", "info", *after],
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_for(READY_LINE, timeout)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for(self, text: str, timeout: float) -> None:
        """Until ``text`` is logged (after this call; :data:`READY_LINE`: since the start)."""
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
        if self.process is not None:
            stop_group(self.process, timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"


def cli_env(worker_env: dict[str, str], **extra: str) -> dict[str, str]:
    """The environment of a ``marvin-faust`` command talking to the worker of ``worker_env``."""
    return {**os.environ, **worker_env, **extra}


def settings_of(env: dict[str, str]) -> Settings:
    """The settings that a process with the ``MARVIN_*`` variables of ``env`` reads."""
    fields = {
        name.removeprefix("MARVIN_").lower(): value
        for name, value in env.items()
        if name.startswith("MARVIN_")
    }
    return load_settings(_env_file=None, **fields)


def say(env: dict[str, str], *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """``marvin-faust say ARGS`` to its end (``timeout`` + 60 s at most), output captured."""
    return subprocess.run(
        [MARVIN, "say", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout + 60,
        stdin=subprocess.DEVNULL,
    )


@dataclass(frozen=True)
class LiveProcess:
    pid: int
    cmdline: str
    environ: frozenset[str]


def live_processes() -> Iterator[LiveProcess]:
    """Every process but this one that is neither a zombie nor dead (states Z and X)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            yield LiveProcess(int(proc.name), cmdline, frozenset(environ))
