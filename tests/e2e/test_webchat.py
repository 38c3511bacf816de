"""The web chat in a real browser: headless Chromium (Debian's, see ``make browser``) driven by
Playwright, the ``marvin-faust webchat`` process, a worker with the stand-in model, the real broker.

The page talks only to the web chat process, which talks only to Kafka (and to the worker's
history view when a page is reopened). A screenshot of each run goes to ``test-artifacts/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest
from playwright.sync_api import expect, sync_playwright

from marvin_faust.testing.ports import free_ports
from marvin_faust.testing.processes import MARVIN, WorkerProcess
from tests.fixtures import REPO

pytestmark = pytest.mark.kafka

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "test-artifacts"
GREETING = "Hello, my name is Marvin. What do you want?"
WAIT_MS = 120_000  # any one step in the browser: the machine is shared and slow
INJECTION = '<img src=x onerror="window.__pwned = true">'
TOKEN = "webchat-test-token"
# The stand-in echoes its prompt; a page's conversation opens with the greeting, which starts
# every window after an empty human turn.
GREETED = ["human: ", f"ai: {GREETING}"]


def echo(*lines: str) -> str:
    """The stand-in's reply in a conversation a page opened: the greeting, then ``lines``."""
    return "\n".join([*GREETED, *lines])


def http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class WebChat:
    """A ``marvin-faust webchat`` process on a free port."""

    worker: WorkerProcess | None = None  # the worker it reads the history from

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        [self.port] = free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process = subprocess.Popen(
            [MARVIN, "webchat", "--port", str(self.port), *args],
            env=env,
            stdout=log_path.open("w"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def wait_until_serving(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"webchat exited:\n{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"webchat not serving after {timeout}s:\n{self.log_path.read_text()}")

    def stop(self) -> int | None:
        """SIGTERM; the exit code, or None when it had to be killed after 30 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return None
        return self.process.returncode


@pytest.fixture()
def browser() -> Iterator:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (Debian's chromium package)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def serving(start_worker, worker_env, tmp_path, **worker_settings: str) -> Iterator[WebChat]:
    """A worker guarding its views with a token, and a web chat that forwards it."""
    worker = start_worker(MARVIN_API_TOKEN=TOKEN, **worker_settings)
    env = {**os.environ, **worker_env, "MARVIN_API_TOKEN": TOKEN, "MARVIN_WORKER_URL": worker.url}
    chat = WebChat(env, tmp_path / "webchat.log")
    chat.worker = worker
    try:
        chat.wait_until_serving()
        yield chat
    finally:
        # Stopped while the pages still hold their event streams open: it must end them.
        code = chat.stop()
    assert code == 0, chat.log_path.read_text()


@pytest.fixture()
def webchat(start_worker, worker_env, tmp_path) -> Iterator[WebChat]:
    with serving(start_worker, worker_env, tmp_path) as chat:
        yield chat


SLOW = {"MARVIN_STANDIN_LATENCY": "5"}  # a stand-in model that takes 5 s to write a reply


@pytest.fixture()
def slow_webchat(start_worker, worker_env, tmp_path) -> Iterator[WebChat]:
    with serving(start_worker, worker_env, tmp_path, **SLOW) as chat:
        yield chat


def ai_texts(page) -> list[str]:
    return page.locator("#messages .turn.ai .text").all_text_contents()


def test_chat_in_the_browser_replies_live_history_on_reopen_and_no_html_injection(browser, webchat):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    page.goto(webchat.url + "/")
    expect(page.locator("#messages .turn.ai .text").first).to_have_text(GREETING)
    expect(page).to_have_url(re.compile(r"/c/[0-9a-f-]{36}$"))
    cid = page.url.rsplit("/c/", 1)[1]
    expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=WAIT_MS)
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads

    page.fill("#text", "Why are you so sad?")
    page.press("#text", "Enter")
    expect(page.locator("#messages .turn.human .text").first).to_have_text("Why are you so sad?")
    first_reply = echo("human: Why are you so sad?")
    expect(page.locator("#messages .turn.ai .text").nth(1)).to_have_text(
        first_reply, timeout=WAIT_MS
    )
    expect(page.locator("#thinking")).to_be_hidden()

    # HTML in a message and in the model's reply (the stand-in echoes it) shows as text.
    page.fill("#text", INJECTION)
    page.click("#send")
    reply_with_html = echo(
        "human: Why are you so sad?", f"ai: {first_reply}", f"human: {INJECTION}"
    )
    expect(page.locator("#messages .turn.ai .text").nth(2)).to_have_text(
        reply_with_html, timeout=WAIT_MS
    )
    assert page.evaluate("window.__sameDocument") is True, "the reply needed a reload"
    assert page.locator("#messages img").count() == 0
    assert page.evaluate("window.__pwned") is None
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webchat.png"), full_page=True)

    # Reopened by id, in both URL forms, the page lists the stored conversation so far.
    expected = [
        GREETING,
        "Why are you so sad?",
        first_reply,
        INJECTION,
        reply_with_html,
    ]
    for path in (f"/c/{cid}", f"/?c={cid}"):
        reopened = browser.new_page()
        reopened.goto(webchat.url + path)
        expect(reopened.locator("#messages .turn .text")).to_have_text(expected, timeout=WAIT_MS)
        assert reopened.locator("#messages img").count() == 0
        assert reopened.evaluate("window.__pwned") is None
        reopened.close()
    assert errors == []


def test_pages_of_two_conversations_get_only_their_replies_and_bad_input_is_refused(
    browser, webchat
):
    first, second = browser.new_page(), browser.new_page()
    for page in (first, second):
        page.goto(webchat.url + "/")
        expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=WAIT_MS)
    first.fill("#text", "alpha")
    second.fill("#text", "bravo")
    first.press("#text", "Enter")
    second.press("#text", "Enter")
    expect(first.locator("#messages .turn.ai .text").nth(1)).to_have_text(
        echo("human: alpha"), timeout=WAIT_MS
    )
    expect(second.locator("#messages .turn.ai .text").nth(1)).to_have_text(
        echo("human: bravo"), timeout=WAIT_MS
    )
    time.sleep(2)  # a stray reply would arrive about as fast as the right one
    assert ai_texts(first) == [GREETING, echo("human: alpha")]
    assert ai_texts(second) == [GREETING, echo("human: bravo")]

    # The API refuses what the page never sends.
    cid = second.url.rsplit("/c/", 1)[1]
    status, body = http("POST", f"{webchat.url}/api/conversations/{cid}/messages", {"text": " "})
    assert (status, body) == (400, {"error": "text must be a non-empty string"})
    status, body = http("GET", f"{webchat.url}/api/conversations/no-such-id/history")
    assert status == 404


def test_a_reply_grows_in_the_page_as_it_is_written_then_settles(browser, slow_webchat):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(slow_webchat.url + "/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=WAIT_MS)

    words = " ".join(f"word{i}" for i in range(24))
    final = echo(f"human: {words}")
    page.fill("#text", words)
    page.press("#text", "Enter")
    partial = page.locator("#messages .turn.ai.partial .text")
    expect(partial).to_have_text(re.compile(r"human: word0"), timeout=WAIT_MS)
    shown = partial.text_content()
    # Partial text: a beginning of the reply, on the page before the reply itself.
    assert shown and final.startswith(shown) and shown != final
    assert page.locator("#messages .turn.ai:not(.partial)").count() == 1  # the greeting
    expect(page.locator("#thinking")).to_be_hidden()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webchat-streaming.png"), full_page=True)
    expect(partial).not_to_have_text(shown)  # and it grows

    expect(page.locator("#messages .turn.ai .text")).to_have_text(
        [GREETING, final], timeout=WAIT_MS
    )
    expect(page.locator("#messages .turn.ai.partial")).to_have_count(0)
    page.screenshot(path=str(ARTIFACTS / "webchat-streamed.png"), full_page=True)

    # A model failure ends the bubble as failed instead of leaving it spinning.
    page.fill("#text", "break down [fail]")
    page.press("#text", "Enter")
    expect(page.locator("#messages .turn.ai.failed .note")).to_have_text(
        "Marvin could not answer: the model failed.", timeout=WAIT_MS
    )
    expect(page.locator("#thinking")).to_be_hidden()
    assert errors == []


@pytest.mark.slow
def test_a_worker_killed_mid_reply_restarts_the_bubble_then_one_reply_settles_it(
    browser, slow_webchat, start_worker
):
    page = browser.new_page()
    page.goto(slow_webchat.url + "/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=WAIT_MS)
    words = " ".join(f"word{i}" for i in range(24))
    page.fill("#text", words)
    page.press("#text", "Enter")
    partial = page.locator("#messages .turn.ai.partial")
    expect(partial.locator(".text")).to_have_text(re.compile(r"word1\b"), timeout=WAIT_MS)

    worker = slow_webchat.worker
    assert worker is not None
    worker.kill()  # mid-reply: the message is redelivered to the restarted worker
    start_worker(worker.data_dir, MARVIN_API_TOKEN=TOKEN, **SLOW)
    expect(partial).to_have_attribute("data-restarted", "true", timeout=WAIT_MS)
    expect(partial).to_have_count(1)
    page.screenshot(path=str(ARTIFACTS / "webchat-restarted.png"), full_page=True)
    expect(page.locator("#messages .turn.ai .text")).to_have_text(
        [GREETING, echo(f"human: {words}")], timeout=WAIT_MS
    )
    time.sleep(3)  # a second reply would come about as fast as the first
    assert ai_texts(page) == [GREETING, echo(f"human: {words}")]


class RecordingWorker:
    """Stands in for the worker's HTTP side: records every request's path and Authorization
    header, and answers a history of no turns."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        recorded = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorded.append((self.path, self.headers.get("Authorization")))
                body = json.dumps({"conversation_id": "?", "total_turns": 0, "turns": []})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingWorker:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def raw_request(url: str, method: str, path: str, body: dict | None = None) -> tuple[int, str]:
    """A request with ``path`` sent exactly as given (urllib would drop a '#' and what follows)."""
    host, port = url.removeprefix("http://").split(":")
    connection = HTTPConnection(host, int(port), timeout=30)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        data = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


HOSTILE_IDS = [
    "x%3Flimit=1",  # as sent by a page: the id is the 11 characters
    "x?limit=1",
    "../health",
    "..",
    "../../metrics",
    "a/b",
    "a?b",
    "a#b",
    "a b",
    ".hidden",
    "x" * 129,
    "x" * 5000,
]
# The same ids as they might appear in a path, raw: decoded by the web chat's router into ids
# that would change the worker URL's path or query.
RAW_SEGMENTS = ["x%3Flimit=1", "..%2Fhealth", "%2E%2E", "../health", "a/b", "a%2Fb", "a%23b"]


def test_hostile_conversation_ids_get_400_and_never_reach_the_worker(
    start_worker, worker_env, tmp_path
):
    start_worker()  # the chat topic the web chat reads
    with RecordingWorker() as fake_worker:
        env = {**os.environ, **worker_env, "MARVIN_API_TOKEN": TOKEN}
        env["MARVIN_WORKER_URL"] = fake_worker.url
        # On every address, as in a container: allowed, since the token is set.
        chat = WebChat(env, tmp_path / "webchat.log", "--bind", "0.0.0.0")
        try:
            chat.wait_until_serving()
            segments = [quote(cid, safe="") for cid in HOSTILE_IDS] + RAW_SEGMENTS
            for segment in segments:
                for method, path, body in [
                    ("GET", f"/api/conversations/{segment}/history", None),
                    ("GET", f"/api/conversations/{segment}/events", None),
                    ("POST", f"/api/conversations/{segment}/messages", {"text": "hi"}),
                    ("GET", f"/c/{segment}", None),
                    ("GET", f"/?c={segment}", None),
                ]:
                    status, text = raw_request(chat.url, method, path, body)
                    assert status == 400, (method, path, status, text)
                    error = json.loads(text)["error"]
                    assert error.startswith("invalid conversation id: "), (path, error)
            status, text = raw_request(chat.url, "GET", "/api/conversations/x%3Flimit=1/history")
            assert json.loads(text)["error"] == (
                "invalid conversation id: conversation_id 'x?limit=1' may only hold ASCII "
                "letters, digits, '-', '_' and '.' (not first)"
            )
            assert fake_worker.requests == []

            # A valid id does reach it, at its own path, with the token.
            cid = str(uuid.uuid4())
            status, text = raw_request(chat.url, "GET", f"/api/conversations/{cid}/history")
            assert (status, json.loads(text)) == (200, {"conversation_id": cid, "turns": []})
            assert fake_worker.requests == [(f"/conversations/{cid}/", f"Bearer {TOKEN}")]
            for path in (f"/c/{cid}", f"/?c={cid}"):  # and the page opens on it
                status, text = raw_request(chat.url, "GET", path)
                assert status == 200 and "<html" in text, path
        finally:
            code = chat.stop()
        assert code == 0, chat.log_path.read_text()


def test_a_web_chat_on_a_public_address_without_a_token_refuses_to_start(worker_env, tmp_path):
    unset = ("MARVIN_API_TOKEN", "MARVIN_ALLOW_UNAUTHENTICATED")
    env = {name: value for name, value in os.environ.items() if name not in unset}
    done = subprocess.run(
        [MARVIN, "webchat", "--bind", "0.0.0.0", "--port", str(free_ports(1)[0])],
        env={**env, **worker_env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.strip() == (
        "marvin-faust: invalid settings: MARVIN_WEBCHAT_BIND='0.0.0.0' is not a loopback "
        "address and MARVIN_API_TOKEN is not set: set it, or MARVIN_ALLOW_UNAUTHENTICATED=1 to "
        "serve without it (unsafe: whoever reaches the port can read the conversations)"
    )
