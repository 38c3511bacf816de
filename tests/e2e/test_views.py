"""The HTTP views against a running worker on the real broker."""

from __future__ import annotations

import time
import uuid

import pytest

from marvin_faust.testing.kafka import ask
from marvin_faust.testing.web import counter, get

pytestmark = pytest.mark.kafka


def wait_ready(worker_url: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, body = get(f"{worker_url}/ready/")
        if status == 200 or time.monotonic() > deadline:
            return {"status": status, "body": body}
        time.sleep(0.5)


def test_conversation_history_over_http(start_worker, worker_env):
    worker = start_worker()
    cid = str(uuid.uuid4())
    replies = ask(worker_env, cid, "Hello", expected_replies=1)
    replies = ask(worker_env, cid, "Anyone?", expected_replies=2)

    status, body = get(f"{worker.url}/conversations/{cid}/")
    assert status == 200
    assert body["conversation_id"] == cid and body["total_turns"] == 4
    assert [(t["role"], t["text"]) for t in body["turns"]] == [
        ("human", "Hello"),
        ("AI", replies[0]["value"]["text"]),
        ("human", "Anyone?"),
        ("AI", replies[1]["value"]["text"]),
    ]
    assert [t["timestamp"] for t in body["turns"]][1::2] == [
        r["value"]["Timestamp"] for r in replies
    ]

    status, body = get(f"{worker.url}/conversations/{cid}/?limit=1")
    assert status == 200 and [t["text"] for t in body["turns"]] == [replies[1]["value"]["text"]]

    for bad in ("0", "-1", "abc", "1.5"):
        status, body = get(f"{worker.url}/conversations/{cid}/?limit={bad}")
        assert status == 400 and "limit must be a positive whole number" in body["error"]

    status, body = get(f"{worker.url}/conversations/{uuid.uuid4()}/")
    assert status == 404 and body["error"].startswith("no conversation")


def test_health_ready_and_no_table_routes(start_worker):
    worker = start_worker()
    assert get(f"{worker.url}/health/") == (200, {"status": "ok"})
    assert wait_ready(worker.url) == {
        "status": 200,
        "body": {"status": "ready", "backend": "standin"},
    }
    status, _ = get(f"{worker.url}/table/")
    assert status == 404
    status, _ = get(f"{worker.url}/table/conversation-history/")
    assert status == 404


def test_metrics_parse_and_move_when_messages_are_answered(start_worker, worker_env):
    worker = start_worker()
    before = counter(worker.url, "marvin_messages_total", outcome="answered")
    ask(worker_env, str(uuid.uuid4()), "Count me", expected_replies=1)
    deadline = time.monotonic() + 10
    while counter(worker.url, "marvin_messages_total", outcome="answered") < before + 1:
        assert time.monotonic() < deadline, "answered counter did not move"
        time.sleep(0.2)
    assert counter(worker.url, "marvin_model_latency_seconds_count") >= 1
    assert counter(worker.url, "marvin_model_tokens_per_second_count") >= 1
    # Faust's own sensor metrics are served from the same registry
    assert counter(worker.url, "faust_messages_received_total") >= 1


def test_a_configured_token_guards_conversation_views(start_worker, worker_env):
    worker = start_worker(MARVIN_API_TOKEN="s3cret")
    env = {**worker_env, "MARVIN_API_TOKEN": "s3cret"}
    cid = str(uuid.uuid4())
    ask(env, cid, "Private", expected_replies=1)
    url = f"{worker.url}/conversations/{cid}/"
    status, body = get(url)
    assert status == 401 and body == {"error": "missing or wrong bearer token"}
    assert get(url, token="wrong")[0] == 401
    status, body = get(url, token="s3cret")
    assert status == 200 and body["turns"][0]["text"] == "Private"
    # liveness stays open for probes
    assert get(f"{worker.url}/health/")[0] == 200


@pytest.mark.slow
def test_two_workers_answer_every_conversation_from_either_port(start_worker, worker_env):
    first = start_worker(MARVIN_PARTITIONS="4")
    second = start_worker(MARVIN_PARTITIONS="4")
    env = {**worker_env, "MARVIN_PARTITIONS": "4"}
    for url in (first.url, second.url):
        assert wait_ready(url)["status"] == 200
    conversations = {}
    for i in range(8):
        cid = str(uuid.uuid4())
        [reply] = ask(env, cid, f"message {i}", expected_replies=1)
        conversations[cid] = [f"message {i}", reply["value"]["text"]]
    for cid, texts in conversations.items():
        for url in (first.url, second.url):
            status, body = get(f"{url}/conversations/{cid}/")
            assert status == 200, (url, body)
            assert [t["text"] for t in body["turns"]] == texts
