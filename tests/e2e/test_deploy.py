"""The Procfile, run as a Procfile runner runs it (honcho), against the real broker."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from marvin_faust.testing.ports import free_ports
from marvin_faust.testing.processes import live_processes
from tests.fixtures import REPO

pytestmark = pytest.mark.kafka

PROCFILE = REPO / "Procfile"
BIN = Path(sys.executable).parent
HONCHO = BIN / "honcho"


def procfile_entries() -> dict[str, str]:
    """``{process type: command}``, parsed as honcho and the platforms parse it."""
    from honcho.environ import parse_procfile

    return dict(parse_procfile(PROCFILE.read_text()).processes)


def processes_with_env(name: str, value: str) -> dict[int, str]:
    """Live processes whose environment has ``name=value``: pid -> command line."""
    return {p.pid: p.cmdline for p in live_processes() if f"{name}={value}" in p.environ}


def http_get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_procfile_runs_the_worker_and_the_web_chat_on_the_platform_port():
    entries = procfile_entries()
    assert entries == {
        "worker": "faust -A marvin_faust worker -l info --web-port $PORT",
        "web": "marvin-faust webchat --port $PORT",
    }


def two_free_ports_100_apart() -> int:
    """A port p with p and p + 100 free: honcho gives the second process PORT + 100."""
    for _ in range(50):
        [port] = free_ports()
        if port + 100 <= 65535:
            with contextlib.suppress(OSError), socket.socket() as sock:
                sock.bind(("127.0.0.1", port + 100))
                return port
    raise AssertionError("no two free ports 100 apart")


@pytest.mark.timeout(300)
def test_honcho_starts_the_procfile_and_stops_it_cleanly(kafka_broker, tmp_path):
    assert HONCHO.exists(), "honcho is in the test extra: pip install -e '.[test]'"
    suffix = uuid.uuid4().hex[:8]
    app_id = f"marvin-procfile-{suffix}"
    port = two_free_ports_100_apart()
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")  # not the developer's .env
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MARVIN_BROKER": f"kafka://{kafka_broker.bootstrap_servers}",
        "MARVIN_APP_ID": app_id,
        "MARVIN_TOPIC": f"chat-procfile-{suffix}",
        "MARVIN_DEAD_LETTER_TOPIC": f"chat-procfile-{suffix}-dead-letters",
        "MARVIN_BACKEND": "standin",
        "MARVIN_DATA_DIR": str(tmp_path / "state"),
        "PORT": str(port),
        "MARVIN_WORKER_URL": f"http://127.0.0.1:{port}",  # the web chat reads history there
    }
    env.pop("MARVIN_WEB_PORT", None)  # the port must come from the Procfile's $PORT
    log_path = tmp_path / "honcho.log"
    with log_path.open("w") as log:
        honcho = subprocess.Popen(
            [str(HONCHO), "-f", str(PROCFILE), "-e", str(empty_env_file), "start"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        status, body = 0, {}
        while time.monotonic() < deadline:
            assert honcho.poll() is None, log_path.read_text()[-3000:]
            try:
                status, body = http_get(f"{base}/ready/")
            except (OSError, ValueError):
                status = 0
            if status == 200:
                break
            time.sleep(0.5)
        assert status == 200, (body, log_path.read_text()[-3000:])
        assert http_get(f"{base}/health/") == (200, {"status": "ok"})
        web = f"http://127.0.0.1:{port + 100}/"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(web, timeout=10) as response:
                    page = response.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.5)
        assert "<html" in page.lower()
        running = processes_with_env("MARVIN_APP_ID", app_id).values()
        assert any("faust -A marvin_faust worker" in line for line in running), running
        assert any("marvin-faust webchat" in line for line in running), running

        honcho.send_signal(signal.SIGTERM)
        assert honcho.wait(60) is not None
    finally:
        if honcho.poll() is None:
            os.killpg(honcho.pid, signal.SIGKILL)
            honcho.wait()
    output = log_path.read_text(errors="replace")
    assert re.search(r"worker\.1\s*\| .*\[\^Worker\]: Ready", output), output[-3000:]
    assert re.search(r"web\.1\s*\| ", output), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    # honcho stopped the worker: nothing with this app id is left running
    deadline = time.monotonic() + 30
    while processes_with_env("MARVIN_APP_ID", app_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with_env("MARVIN_APP_ID", app_id) == {}
