"""End to end: real broker, worker processes started as a user starts them, plain clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from marvin_faust.testing.kafka import (
    ask,
    bootstrap_of,
    changelog_topic,
    consume,
    produce,
    replies_for,
    run,
    wire_value,
)
from marvin_faust.testing.processes import FAUST, WorkerProcess
from marvin_faust.testing.web import get

pytestmark = pytest.mark.kafka

GREETING = "Hello, my name is Marvin. What do you want?"


def changelog_history(env: dict, cid: str) -> list[dict]:
    bootstrap = bootstrap_of(env)
    records = run(
        consume(
            bootstrap,
            changelog_topic(env["MARVIN_APP_ID"]),
            until=lambda rs: any(r.key == cid.encode() for r in rs),
        )
    )
    return json.loads([r for r in records if r.key == cid.encode()][-1].value)


def test_stand_in_conversation_round_trip_and_history_across_restarts(start_worker, worker_env):
    worker = start_worker()
    cid = str(uuid.uuid4())

    [first] = ask(worker_env, cid, "Hello", expected_replies=1, message_id="m-1")
    assert first["value"]["conversation_id"] == first["value"]["uuid"] == cid
    assert first["value"]["text"] == "human: Hello"
    assert first["headers"]["in-reply-to"] == b"m-1"

    # the second message's prompt holds the first turn (the stand-in echoes its prompt)
    second = ask(worker_env, cid, "Again", expected_replies=2)[1]
    assert second["value"]["text"] == "human: Hello\nai: human: Hello\nhuman: Again"

    # history survives a restart of the worker, and a fresh worker with no local state at all
    worker.stop()
    start_worker(data_dir=worker.data_dir)
    third = ask(worker_env, cid, "Third", expected_replies=3)[2]
    assert third["value"]["text"].startswith("human: Hello\nai: human: Hello\nhuman: Again")
    assert third["value"]["text"].endswith("human: Third")


def test_a_fresh_worker_rebuilds_history_from_the_changelog(start_worker, worker_env, tmp_path):
    first_worker = start_worker()
    cid = str(uuid.uuid4())
    ask(worker_env, cid, "Remember me", expected_replies=1)
    first_worker.stop()
    start_worker(data_dir=tmp_path / "empty-state")
    second = ask(worker_env, cid, "Do you?", expected_replies=2)[1]
    assert second["value"]["text"].startswith("human: Remember me\nai: human: Remember me")


def test_poison_messages_are_dead_lettered_and_good_ones_still_answered(start_worker, worker_env):
    start_worker()
    bootstrap = bootstrap_of(worker_env)
    cid = str(uuid.uuid4())
    poison = [
        (cid.encode(), b"{not json"),
        (cid.encode(), b"\xff\xfe\x00"),
        (cid.encode(), json.dumps({"role": "human", "text": "hi"}).encode()),
        (cid.encode(), wire_value(cid, "")),
        (
            cid.encode(),
            json.dumps(
                {
                    "uuid": cid,
                    "role": "human",
                    "text": "x",
                    "conversation_id": cid,
                    "Timestamp": "now",
                }
            ).encode(),
        ),
        (cid.encode(), None),
        (cid.encode(), wire_value(cid, "boom [fail]")),
    ]
    run(
        produce(
            bootstrap, worker_env["MARVIN_TOPIC"], [*poison, (cid.encode(), wire_value(cid, "ok?"))]
        )
    )
    letters = run(
        consume(
            bootstrap,
            worker_env["MARVIN_DEAD_LETTER_TOPIC"],
            until=lambda rs: len(rs) >= len(poison),
            settle=1.0,
        )
    )
    assert [r.value for r in letters] == [value for _, value in poison]
    reasons = [dict(r.headers)["dead-letter-reason"].decode() for r in letters]
    assert reasons[0].startswith("bad message: value is not JSON")
    assert reasons[1].startswith("bad message: value is not UTF-8")
    assert reasons[2] == "bad message: missing field 'uuid'"
    assert reasons[3] == "bad message: empty text"
    assert reasons[4] == "bad message: field 'Timestamp' must be int, got str"
    assert reasons[5] == "bad message: null value (tombstone)"
    assert reasons[6].startswith("model failed: RuntimeError")
    records = run(
        consume(
            bootstrap,
            worker_env["MARVIN_TOPIC"],
            until=lambda rs: len(replies_for(rs, cid)) >= 1,
            settle=1.0,
        )
    )
    [reply] = replies_for(records, cid)
    assert reply["value"]["text"] == "human: ok?"


def test_greet_opens_a_conversation_stored_as_the_first_ai_turn(start_worker, worker_env):
    start_worker()
    env = {**os.environ, **worker_env}
    done = subprocess.run(
        [FAUST, "-A", "marvin_faust", "greet"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    cid = done.stdout.strip()
    assert str(uuid.UUID(cid)) == cid
    bootstrap = bootstrap_of(worker_env)
    records = run(
        consume(
            bootstrap, worker_env["MARVIN_TOPIC"], until=lambda rs: len(replies_for(rs, cid)) >= 1
        )
    )
    [greeting] = replies_for(records, cid)
    assert greeting["value"]["text"] == GREETING
    assert greeting["value"]["uuid"] == cid
    history = changelog_history(worker_env, cid)
    assert [(t["role"], t["text"]) for t in history] == [("AI", GREETING)]


@pytest.mark.model
def test_real_model_answers_exactly_once(start_worker, worker_env):
    env = {**worker_env, "MARVIN_BACKEND": "llamacpp", "MARVIN_MAX_TOKENS": "60"}
    start_worker(**env)
    cid = str(uuid.uuid4())
    [reply] = ask(env, cid, "Hello Marvin, how are you today?", expected_replies=1)
    text = reply["value"]["text"]
    assert text and "[INST]" not in text and "<<SYS>>" not in text
    assert reply["value"]["role"] == "AI" and reply["value"]["conversation_id"] == cid
    history = changelog_history(env, cid)
    assert [(t["role"], t["text"]) for t in history] == [
        ("human", "Hello Marvin, how are you today?"),
        ("AI", text),
    ]


def run_worker_expecting_failure(env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [FAUST, "-A", "marvin_faust", "worker", "-l", "info"],
        env={**os.environ, **env, "MARVIN_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_bad_setting_stops_the_start_with_one_clear_line(tmp_path):
    done = run_worker_expecting_failure({"MARVIN_N_CTX": "lots"}, tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "marvin-faust: invalid settings: MARVIN_N_CTX: Input should be a valid integer, "
        "unable to parse string as an integer (got 'lots')"
    )


UNGUARDED_WORKER = (
    "marvin-faust: invalid settings: MARVIN_WEB_BIND='0.0.0.0' is not a loopback address and "
    "MARVIN_API_TOKEN is not set: set it, or MARVIN_ALLOW_UNAUTHENTICATED=1 to serve without it "
    "(unsafe: whoever reaches the port can read the conversations)"
)


def test_a_worker_on_a_public_address_needs_a_token_or_the_override(
    worker_env, start_worker, tmp_path
):
    public = {**worker_env, "MARVIN_WEB_BIND": "0.0.0.0"}
    unset = ("MARVIN_API_TOKEN", "MARVIN_ALLOW_UNAUTHENTICATED")
    environ = {name: value for name, value in os.environ.items() if name not in unset}
    done = subprocess.run(
        [FAUST, "-A", "marvin_faust", "worker", "-l", "info"],
        env={**environ, **public, "MARVIN_DATA_DIR": str(tmp_path / "refused")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stderr.strip(), done.stdout) == (2, UNGUARDED_WORKER, "")

    # With a token, or with the override, the same worker starts and serves on every address.
    for allowed in ({"MARVIN_API_TOKEN": "s3cret"}, {"MARVIN_ALLOW_UNAUTHENTICATED": "1"}):
        worker = start_worker(MARVIN_WEB_BIND="0.0.0.0", **allowed)
        assert get(f"{worker.url}/health/") == (200, {"status": "ok"})
        worker.stop()
        assert worker.process is not None and worker.process.returncode == 0, worker.tail()


def test_a_missing_model_stops_the_worker_at_start(worker_env, tmp_path):
    env = {
        **worker_env,
        "MARVIN_BACKEND": "llamacpp",
        "MARVIN_MODEL_SOURCE": "path",
        "MARVIN_MODEL_PATH": str(tmp_path / "missing.gguf"),
    }
    done = run_worker_expecting_failure(env, tmp_path)
    assert done.returncode != 0
    assert f"marvin-faust: cannot start: model file not found: {tmp_path}/missing.gguf" in (
        done.stderr
    )


def test_python_dash_m_runs_the_same_cli():
    done = subprocess.run(
        [sys.executable, "-m", "marvin_faust", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    assert "greet" in done.stdout and "worker" in done.stdout


def test_faust_options_and_broker_url_are_the_settings(worker_env, tmp_path):
    """``faust -A marvin_faust --datadir X worker --web-port P`` with Faust's ``BROKER_URL``:
    the state goes to X, the web server listens on P, the broker is BROKER_URL's."""
    env = {k: v for k, v in worker_env.items() if k != "MARVIN_BROKER"}
    env["BROKER_URL"] = worker_env["MARVIN_BROKER"]
    data_dir = tmp_path / "from-the-command-line"
    worker = WorkerProcess(
        env=env, data_dir=data_dir, log_path=tmp_path / "cli.log", faust_options=True
    )
    try:
        worker.start()
        with urllib.request.urlopen(f"{worker.url}/ready/", timeout=30) as response:
            assert response.status == 200
        assert list(data_dir.rglob("tables")), "the table state is not under --datadir"
    finally:
        worker.stop()
