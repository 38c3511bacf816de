"""The HTTP views against a running worker on the real broker."""

from __future__ import annotations

import time
import uuid
from urllib.parse import quote

import pytest

from marvin_faust.testing.kafka import ask
from marvin_faust.testing.processes import settings_of
from marvin_faust.testing.web import counter, delete, get

pytestmark = pytest.mark.kafka

TOKEN = "s3cret"
# Every route of the worker's web server, and who gets an answer: anyone (probes), or only
# a request with the token. A route missing here fails test_every_route_... below.
OPEN, GUARDED = "open", "token"
ROUTES = {
    "/": OPEN,  # Faust's production index: {"status": "OK"}
    "/health/": OPEN,
    "/ready/": OPEN,
    "/metrics": OPEN,
    "/conversations/{conversation_id}/": GUARDED,
}
# Methods other than GET (and HEAD) a route takes.
MORE_METHODS = {"/conversations/{conversation_id}/": {"DELETE"}}
# Faust's built-in routes that are switched off.
FAUST_ROUTES_OFF = ["/router/", "/router/topics", "/table/", "/graph/", "/stats/", "/assignment/"]


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


def test_health_ready_and_no_table_or_router_routes(start_worker):
    worker = start_worker()
    assert get(f"{worker.url}/health/") == (200, {"status": "ok"})
    assert wait_ready(worker.url) == {
        "status": 200,
        "body": {"status": "ready", "backend": "standin"},
    }
    for path in [*FAUST_ROUTES_OFF, "/table/conversation-history/"]:
        assert get(worker.url + path)[0] == 404, path


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


def served_routes(env: dict[str, str], data_dir) -> dict[str, set[str]]:
    """Path -> methods of every route of the worker's web server, from its aiohttp router,
    built as the worker builds it (``create_app``, then Faust's ``init_server``)."""
    from marvin_faust.app import create_app

    app = create_app(settings_of({**env, "MARVIN_DATA_DIR": str(data_dir)}))
    app.web.init_server()
    routes: dict[str, set[str]] = {}
    for route in app.web.web_app.router.routes():
        routes.setdefault(route.resource.canonical, set()).add(route.method)
    return routes


def test_every_route_answers_with_the_token_and_only_probes_without(
    start_worker, worker_env, tmp_path
):
    routes = served_routes({**worker_env, "MARVIN_API_TOKEN": TOKEN}, tmp_path / "routes")
    assert set(routes) == set(ROUTES), "a route was added or removed: list it in ROUTES"
    assert routes == {r: {"GET", "HEAD", *MORE_METHODS.get(r, ())} for r in ROUTES}, routes

    worker = start_worker(MARVIN_API_TOKEN=TOKEN)
    assert wait_ready(worker.url)["status"] == 200
    cid = str(uuid.uuid4())
    ask({**worker_env, "MARVIN_API_TOKEN": TOKEN}, cid, "Private", expected_replies=1)
    for route, access in ROUTES.items():
        url = worker.url + route.format(conversation_id=cid)
        assert get(url, token=TOKEN)[0] == 200, url
        for token in (None, "wrong"):
            status, body = get(url, token=token)
            if access == OPEN:
                assert status == 200, (url, status, body)
            else:
                assert (status, body) == (401, {"error": "missing or wrong bearer token"}), url
    status, body = get(f"{worker.url}/conversations/{cid}/", token=TOKEN)
    assert isinstance(body, dict) and body["turns"][0]["text"] == "Private"
    for path in FAUST_ROUTES_OFF:
        assert get(worker.url + path, token=TOKEN)[0] == 404, path

    # Ids that would change the meaning of a URL: 400 with the token, 401 without.
    segments = ["x%3Flimit=1", "..%2Fhealth", "%2E%2E", "a%20b", "a%23b", quote("x" * 129)]
    for segment in segments:
        url = f"{worker.url}/conversations/{segment}/"
        status, body = get(url, token=TOKEN)
        assert status == 400 and isinstance(body, dict), (segment, status, body)
        assert body["error"].startswith("invalid conversation id: conversation_id "), body
        assert get(url)[0] == 401
        assert delete(url, token=TOKEN)[0] == 400


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
