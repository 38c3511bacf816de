"""Retention and deletion against the real broker and real workers: expiry of idle
conversations, ``marvin-faust forget`` and ``DELETE /conversations/{id}/``, a kill -9 during a
sweep, and the changelog's configuration.

Idle conversations are written straight into the history changelog with turns two hours old
(the worker recovers them as its own), under a TTL of one hour: due at once, while every
conversation the test talks to stays well within it.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from marvin_faust.conversation import Turn, make_turn
from marvin_faust.testing.kafka import (
    ask,
    bootstrap_of,
    changelog_topic,
    latest_values,
    one_conversation_per_partition,
    produce,
    run,
    topic_config,
    wire_value,
    write_histories,
)
from marvin_faust.testing.processes import MARVIN, cli_env
from marvin_faust.testing.web import counter, delete, get

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

TTL = {"MARVIN_CONVERSATION_TTL": "3600", "MARVIN_EXPIRY_INTERVAL": "1"}
TOKEN = "s3cret"


def history(cid: str, age_seconds: float, turns: int = 2) -> list[Turn]:
    """Alternating human / AI turns, the newest ``age_seconds`` old."""
    newest = time.time_ns() - int(age_seconds * 1e9)
    return [
        make_turn(
            "human" if n % 2 == 0 else "AI",
            f"turn {n} of {cid[:8]}",
            newest - (turns - 1 - n),
            str(uuid.uuid4()),
        )
        for n in range(turns)
    ]


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"no {what} after {timeout}s"
        time.sleep(0.5)
    return result


def view(worker, cid: str, token: str | None = None) -> tuple[int, Any]:
    return get(f"{worker.url}/conversations/{cid}/", token)


def turn_texts(worker, cid: str, token: str | None = None) -> list[str]:
    status, body = view(worker, cid, token)
    assert status == 200, (cid, status, body)
    return [turn["text"] for turn in body["turns"]]


def committed_when(bootstrap: str, topic: str, check: Callable[[dict], bool]) -> dict | None:
    """The changelog's latest committed values if ``check`` holds of them, else None."""
    latest = run(latest_values(bootstrap, topic))
    return latest if check(latest) else None


def forget(env: dict, cid: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MARVIN, "forget", cid],
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_idle_conversations_expire_everywhere_and_live_ones_stay(start_worker, worker_env):
    env = {**worker_env, **TTL, "MARVIN_CHANGELOG_DELETE_RETENTION": "600"}
    settings = {**TTL, "MARVIN_CHANGELOG_DELETE_RETENTION": "600"}
    bootstrap, changelog = bootstrap_of(env), changelog_topic(env["MARVIN_APP_ID"])
    first = start_worker(**settings)
    config = run(topic_config(bootstrap, changelog))
    assert config["cleanup.policy"] == "compact"
    assert config["delete.retention.ms"] == "600000"
    assert config["max.compaction.lag.ms"] == "86400000"

    live = [str(uuid.uuid4()) for _ in range(2)]
    for cid in live:
        ask(env, cid, "I am still here", expected_replies=1)
    first.stop()
    idle = {str(uuid.uuid4()): history("idle", age_seconds=7200) for _ in range(6)}
    revived = str(uuid.uuid4())
    revived_turns = history(revived, age_seconds=7200)
    run(write_histories(bootstrap, changelog, {**idle, revived: revived_turns}))
    # On the chat topic before any expiry record: it keeps its conversation, history and all.
    run(produce(bootstrap, env["MARVIN_TOPIC"], [(revived.encode(), wire_value(revived, "Hi"))]))

    second = start_worker(data_dir=first.data_dir, **settings)
    for cid in idle:
        wait_for(lambda cid=cid: view(second, cid)[0] == 404, 120, f"expiry of {cid}")
    for cid in live:
        assert turn_texts(second, cid)[0] == "I am still here"
    wait_for(lambda: len(turn_texts(second, revived)) == 4, 60, "reply to the revived one")
    assert turn_texts(second, revived)[:2] == [t["text"] for t in revived_turns]
    assert counter(second.url, "marvin_conversations_expired_total") == len(idle)
    assert counter(second.url, "marvin_conversations_stored") == len(live) + 1

    # Deleted from the table at once, the tombstones visible once their transaction commits.
    latest = wait_for(
        lambda: committed_when(
            bootstrap, changelog, lambda v: all(v[c.encode()] is None for c in idle)
        ),
        60,
        "the tombstones",
    )
    assert all(latest[cid.encode()] is not None for cid in [*live, revived])

    second.stop()
    fresh = start_worker(**settings)  # an empty data dir: everything from the changelog
    for cid in live:
        assert turn_texts(fresh, cid)[0] == "I am still here"
    assert len(turn_texts(fresh, revived)) == 4
    assert all(view(fresh, cid)[0] == 404 for cid in idle)


def test_forget_and_delete_remove_a_conversation_everywhere(start_worker, worker_env):
    env = {**worker_env, "MARVIN_API_TOKEN": TOKEN}
    bootstrap, changelog = bootstrap_of(env), changelog_topic(env["MARVIN_APP_ID"])
    worker = start_worker(MARVIN_API_TOKEN=TOKEN)
    by_cli, by_http, kept = (str(uuid.uuid4()) for _ in range(3))
    for cid in (by_cli, by_http, kept):
        ask(env, cid, "Remember this", expected_replies=1)

    done = forget(env, by_cli)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: view(worker, by_cli, TOKEN)[0] == 404, 60, "forget of the CLI's one")

    url = f"{worker.url}/conversations/{by_http}/"
    assert delete(url)[0] == 401
    assert delete(url, token="wrong")[0] == 401
    assert delete(url, TOKEN) == (200, {"conversation_id": by_http, "deleted": True})
    assert get(url, TOKEN)[0] == 404
    # Idempotent: nothing left to delete, and nothing else changes.
    assert delete(url, TOKEN)[0] == 404
    assert forget(env, by_cli).returncode == 0
    assert turn_texts(worker, kept, TOKEN)[0] == "Remember this"
    assert counter(worker.url, "marvin_conversations_forgotten_total") == 2

    # A message to a forgotten conversation starts a fresh one.
    ask(env, by_cli, "Who are you?", expected_replies=2)
    assert turn_texts(worker, by_cli, TOKEN)[0] == "Who are you?"
    assert len(turn_texts(worker, by_cli, TOKEN)) == 2

    latest = wait_for(
        lambda: committed_when(bootstrap, changelog, lambda v: v[by_http.encode()] is None),
        60,
        "the tombstone",
    )
    assert json.loads(latest[by_cli.encode()])[0]["text"] == "Who are you?"

    worker.stop()
    fresh = start_worker(MARVIN_API_TOKEN=TOKEN)
    assert view(fresh, by_http, TOKEN)[0] == 404
    assert turn_texts(fresh, by_cli, TOKEN)[0] == "Who are you?"
    assert turn_texts(fresh, kept, TOKEN)[0] == "Remember this"


def test_forget_fails_in_one_line_without_a_chat_topic_or_a_valid_id(worker_env):
    done = forget({**worker_env, "MARVIN_TOPIC": f"absent-{uuid.uuid4().hex[:8]}"}, "c")
    assert done.returncode != 0
    assert done.stderr.strip().startswith("marvin-faust: topic ")
    assert len(done.stderr.strip().splitlines()) == 1
    done = forget(worker_env, "../a")
    assert done.returncode != 0
    assert done.stderr.strip().startswith("marvin-faust: invalid conversation id: ")


@pytest.mark.slow
def test_a_worker_killed_mid_sweep_loses_nothing_that_was_not_due(start_worker, worker_env):
    env = {**worker_env, **TTL}
    bootstrap, changelog = bootstrap_of(env), changelog_topic(env["MARVIN_APP_ID"])
    first = start_worker(**TTL)
    live = [str(uuid.uuid4()) for _ in range(2)]
    for cid in live:
        ask(env, cid, "Still here", expected_replies=1)
    first.stop()
    due = {str(uuid.uuid4()): history("due", age_seconds=7200) for _ in range(4000)}
    recent = {str(uuid.uuid4()): history("recent", age_seconds=60) for _ in range(400)}
    run(write_histories(bootstrap, changelog, {**due, **recent}))

    second = start_worker(data_dir=first.data_dir, **TTL)
    expired = wait_for(
        lambda: counter(second.url, "marvin_conversations_expired_total"), 120, "a first expiry"
    )
    second.kill()
    print(f"\n[kill -9 mid-sweep] {expired:.0f} of {len(due)} due ones deleted before the kill")
    third = start_worker(data_dir=first.data_dir, **TTL)

    latest = wait_for(
        lambda: committed_when(
            bootstrap, changelog, lambda v: all(v[c.encode()] is None for c in due)
        ),
        240,
        "deletion of every due conversation",
    )
    for cid, turns in recent.items():
        assert json.loads(latest[cid.encode()]) == turns, cid
    for cid in live:
        assert turn_texts(third, cid)[0] == "Still here"
    for cid in list(recent)[:20]:
        assert turn_texts(third, cid) == [t["text"] for t in recent[cid]]


@pytest.mark.slow
def test_delete_is_routed_to_the_owner_from_either_worker(start_worker, worker_env):
    env = {**worker_env, "MARVIN_PARTITIONS": "4"}
    workers = [start_worker(MARVIN_PARTITIONS="4") for _ in range(2)]
    for worker in workers:
        wait_for(lambda w=worker: get(f"{w.url}/ready/")[0] == 200, 60, "readiness")
    cids = one_conversation_per_partition(4)
    for cid in cids:
        ask(env, cid, "Remember this", expected_replies=1)
    for n, cid in enumerate(cids):  # each asked of both workers in turn: some are routed
        status, body = delete(f"{workers[n % 2].url}/conversations/{cid}/")
        # 202: the owner had not applied it within 10 s (a rebalance can hold it up)
        assert status in (200, 202) and body["conversation_id"] == cid, (cid, status, body)
    for worker in workers:
        wait_for(
            lambda w=worker: [view(w, cid)[0] for cid in cids] == [404] * 4, 60, "the deletions"
        )
