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
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

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

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        [self.port] = free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process = subprocess.Popen(
            [MARVIN, "webchat", "--port", str(self.port)],
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
    expect(page.locator("#messages .turn.ai .text").nth(1)).to_have_text(
        "human: Why are you so sad?", timeout=WAIT_MS
    )
    expect(page.locator("#thinking")).to_be_hidden()

    # HTML in a message and in the model's reply (the stand-in echoes it) shows as text.
    page.fill("#text", INJECTION)
    page.click("#send")
    reply_with_html = "\n".join(
        [
            "human: Why are you so sad?",
            "ai: human: Why are you so sad?",
            f"human: {INJECTION}",
        ]
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
        "human: Why are you so sad?",
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
        "human: alpha", timeout=WAIT_MS
    )
    expect(second.locator("#messages .turn.ai .text").nth(1)).to_have_text(
        "human: bravo", timeout=WAIT_MS
    )
    time.sleep(2)  # a stray reply would arrive about as fast as the right one
    assert ai_texts(first) == [GREETING, "human: alpha"]
    assert ai_texts(second) == [GREETING, "human: bravo"]

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
    final = f"human: {words}"
    page.fill("#text", words)
    page.press("#text", "Enter")
    partial = page.locator("#messages .turn.ai.partial .text")
    expect(partial).to_have_text(re.compile(r"^human: word0"), timeout=WAIT_MS)
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
        [GREETING, f"human: {words}"], timeout=WAIT_MS
    )
    time.sleep(3)  # a second reply would come about as fast as the first
    assert ai_texts(page) == [GREETING, f"human: {words}"]
