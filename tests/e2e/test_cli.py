"""The terminal front ends (``marvin-faust chat`` / ``say``) as a user runs them: the real command
in a pseudo-terminal (pexpect), the real broker, a running worker with the stand-in model.

The stand-in echoes its prompt, so a reply shows exactly which turns reached the model: the first
reply of a conversation ``chat`` opened is the greeting (after the empty human turn that opens a
window starting on an AI turn) then ``human: <line>``; the second holds the first exchange too.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import uuid

import pexpect
import pytest

from marvin_faust.testing.ports import free_ports
from marvin_faust.testing.processes import MARVIN, cli_env, say

pytestmark = pytest.mark.kafka

GREETING = "Hello, my name is Marvin. What do you want?"
WAIT = 120  # seconds for any one step: the machine is shared and slow
PROMPT = "You: "
CONVERSATION_LINE = re.compile(r"\[conversation ([0-9a-f-]{36})\]")
# How the stand-in's echo of a prompt starts in a conversation opened with the greeting.
GREETED = ["human: ", f"ai: {GREETING}"]


def as_ai(reply: list[str]) -> list[str]:
    """The echo lines of an earlier reply (a list of lines) in a later prompt."""
    return [f"ai: {reply[0]}", *reply[1:]]


def spawn_chat(env: dict[str, str], *args: str) -> pexpect.spawn:
    """``marvin-faust chat`` in a pseudo-terminal; ``transcript(child)`` is all it printed."""
    child = pexpect.spawn(
        MARVIN,
        ["chat", "--timeout", str(WAIT), *args],
        env=env,
        encoding="utf-8",
        timeout=WAIT,
        dimensions=(40, 200),
    )
    child.logfile_read = io.StringIO()
    return child


def transcript(child: pexpect.spawn) -> str:
    return child.logfile_read.getvalue()


def expect_reply(child: pexpect.spawn, lines: list[str]) -> None:
    """The reply, line after line (the terminal turns "\\n" into "\\r\\n"), then the prompt."""
    child.expect_exact("Marvin: " + "\r\n".join(lines) + "\r\n")
    child.expect_exact(PROMPT)


def exit_status(child: pexpect.spawn) -> int | None:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_chat_new_conversation_quit_then_resume_and_ctrl_d(start_worker, worker_env):
    start_worker()
    env = cli_env(worker_env)

    child = spawn_chat(env)
    child.expect(CONVERSATION_LINE)
    cid = child.match.group(1)
    child.expect_exact(f"Marvin: {GREETING}")
    child.expect_exact(PROMPT)
    child.sendline("Why are you so sad?")
    # not its own greeting, which it sent after it started listening
    first = [*GREETED, "human: Why are you so sad?"]
    expect_reply(child, first)
    child.sendline("Still?")
    second = [*first, *as_ai(first), "human: Still?"]
    expect_reply(child, second)
    child.sendline("/quit")
    assert exit_status(child) == 0

    resumed = spawn_chat(env, cid)
    resumed.expect_exact(f"[resuming conversation {cid}]")
    resumed.expect_exact(PROMPT)
    resumed.sendline("Back again")
    expect_reply(resumed, [*second, *as_ai(second), "human: Back again"])  # the whole history
    resumed.sendeof()  # Ctrl-D
    assert exit_status(resumed) == 0


def test_two_conversations_at_once_each_client_sees_only_its_own(start_worker, worker_env):
    start_worker()
    env = cli_env(worker_env)
    first, second = spawn_chat(env), spawn_chat(env)
    for child in (first, second):
        child.expect(CONVERSATION_LINE)
        child.expect_exact(PROMPT)
    # Both wait at the same time; each reads every reply on the topic and must pick its own.
    first.sendline("alpha")
    second.sendline("bravo")
    alpha = [*GREETED, "human: alpha"]
    expect_reply(first, alpha)
    expect_reply(second, [*GREETED, "human: bravo"])
    first.sendline("charlie")
    expect_reply(first, [*alpha, *as_ai(alpha), "human: charlie"])
    for child in (first, second):
        child.sendline("/quit")
        assert exit_status(child) == 0
    assert "bravo" not in transcript(first)
    assert "alpha" not in transcript(second)
    assert "charlie" not in transcript(second)


def test_say_plain_json_in_parallel_and_timeout(start_worker, worker_env):
    # A model that hangs is given up by the worker only after 10 minutes: the client's own
    # --timeout must end the wait.
    worker = start_worker(MARVIN_MODEL_TIMEOUT="600")
    env = cli_env(worker_env)
    cid_a, cid_b = str(uuid.uuid4()), str(uuid.uuid4())

    plain = subprocess.Popen(
        [MARVIN, "say", "--timeout", str(WAIT), cid_a, "Hello from A"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    as_json = say(env, "--json", "--timeout", str(WAIT), cid_b, "Hello from B")
    out, err = plain.communicate(timeout=WAIT + 60)

    assert plain.returncode == 0, err
    assert out == "human: Hello from A\n"
    assert as_json.returncode == 0, as_json.stderr
    record = json.loads(as_json.stdout)
    assert record["role"] == "AI"
    assert record["conversation_id"] == record["uuid"] == cid_b
    assert record["text"] == "human: Hello from B"
    assert isinstance(record["Timestamp"], int)

    hung = say(env, "--timeout", "5", cid_a, "Are you there? [hang]")
    assert hung.returncode != 0
    assert hung.stdout == ""
    assert hung.stderr.strip().splitlines() == ["marvin-faust: no reply from Marvin within 5s"]
    worker.kill()  # its model thread is stuck in [hang] until the 10 minutes are up


def test_unreachable_broker_and_missing_topic_fail_with_one_line(kafka_broker, worker_env):
    [closed_port] = free_ports(1)
    unreachable = cli_env(worker_env, MARVIN_BROKER=f"kafka://127.0.0.1:{closed_port}")
    for args in (["say", "some-id", "Hello"], ["chat"], ["greet"]):
        result = subprocess.run(
            [MARVIN, *args],
            env=unreachable,
            capture_output=True,
            text=True,
            timeout=WAIT,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode != 0, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith(f"marvin-faust: cannot reach Kafka at 127.0.0.1:{closed_port}")

    # A broker but no worker has ever run: the chat topic does not exist.
    no_topic = cli_env(worker_env, MARVIN_TOPIC=f"chat-never-{uuid.uuid4().hex[:8]}")
    result = say(no_topic, "--timeout", "5", "some-id", "Hello")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"marvin-faust: topic {no_topic['MARVIN_TOPIC']!r} does not exist: "
        "is a marvin-faust worker running?"
    ]


def test_an_invalid_conversation_id_fails_with_one_line_before_kafka(worker_env):
    [closed_port] = free_ports(1)
    # No broker at that address: the id is refused before anything connects.
    env = cli_env(worker_env, MARVIN_BROKER=f"kafka://127.0.0.1:{closed_port}")
    for args in (
        ["say", "../health", "Hello"],
        ["chat", "a/b"],
        ["greet", "--conversation-id=a b"],
    ):
        result = subprocess.run(
            [MARVIN, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=WAIT,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 1, args
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("marvin-faust: invalid conversation id: conversation_id '"), line
        assert "may only hold ASCII letters, digits" in line


def test_chat_shows_the_first_words_before_the_reply_is_complete(start_worker, worker_env):
    start_worker(MARVIN_STANDIN_LATENCY="5")  # a reply takes 5 s to write
    child = spawn_chat(cli_env(worker_env))
    child.expect(CONVERSATION_LINE)
    child.expect_exact(PROMPT)
    words = " ".join(f"word{i}" for i in range(24))
    child.sendline(words)
    child.expect_exact("Marvin: " + "\r\n".join([*GREETED, "human: word0"]))
    # The first words are on the screen; the rest of the reply is not written yet.
    assert "word23" not in child.after + child.buffer
    child.expect_exact(words.removeprefix("word0") + "\r\n")  # the rest, then the prompt
    child.expect_exact(PROMPT)
    whole = "Marvin: " + "\r\n".join([*GREETED, f"human: {words}"]) + "\r\n"
    assert transcript(child).count(whole) == 1
    child.sendline("/quit")
    assert exit_status(child) == 0


def test_say_stream_prints_tokens_as_text_and_streaming_off_still_answers(start_worker, worker_env):
    start_worker(MARVIN_STANDIN_LATENCY="1")
    env = cli_env(worker_env)
    cid = str(uuid.uuid4())
    # The stand-in echoes the message: escape sequences in it come back from "the model".
    hostile = "red \x1b[31mRED\x1b[0m \x1b]0;title\x07 bell\x07"
    streamed = say(env, "--stream", "--timeout", str(WAIT), cid, hostile)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == "human: red [31mRED[0m ]0;title bell\n"

    # --json prints the record as it came; with --stream it is refused.
    both = say(env, "--stream", "--json", cid, "hi")
    assert both.returncode != 0
    assert both.stderr.strip() == (
        "marvin-faust: --json and --stream exclude each other: a record is printed whole"
    )
    failed = say(env, "--stream", "--timeout", str(WAIT), cid, "oops [fail]")
    assert failed.returncode != 0
    assert failed.stderr.strip().splitlines() == [
        "marvin-faust: Marvin could not answer (the model failed); "
        "the message went to the dead-letter topic"
    ]


def test_chat_and_say_work_with_streaming_off(start_worker, worker_env):
    start_worker(MARVIN_STREAM_TOPIC="")
    env = cli_env(worker_env, MARVIN_STREAM_TOPIC="")
    cid = str(uuid.uuid4())
    assert say(env, "--stream", "--timeout", str(WAIT), cid, "quiet").stdout == "human: quiet\n"
    child = spawn_chat(env, cid)
    child.expect_exact(PROMPT)
    child.sendline("still there?")
    expect_reply(child, ["human: quiet", "ai: human: quiet", "human: still there?"])
    child.sendline("/quit")
    assert exit_status(child) == 0
