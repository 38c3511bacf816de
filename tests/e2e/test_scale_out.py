"""Scale-out: two worker processes in one consumer group share the partitions; when one stops
the other answers every conversation with its whole history, and again after it comes back.

The stand-in model echoes its prompt, so each reply shows which history the worker saw.
"""

from __future__ import annotations

import json
import uuid

import pytest

from marvin_faust.testing.kafka import bootstrap_of, consume, produce, run, wire_value
from marvin_faust.testing.web import counter, get

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

CONVERSATIONS = 20
PARTITIONS = 4


class Conversations:
    """20 conversations on the chat topic: what was sent, and the replies read back."""

    def __init__(self, env: dict[str, str]) -> None:
        self.bootstrap = bootstrap_of(env)
        self.topic = env["MARVIN_TOPIC"]
        self.ids = [str(uuid.uuid4()) for _ in range(CONVERSATIONS)]
        self.sent: dict[str, list[tuple[str, str]]] = {cid: [] for cid in self.ids}  # (id, text)
        self.replies: dict[str, list[str]] = {}

    def send_turn(self) -> int:
        """One more human message in every conversation; returns the turn number (1, 2...)."""
        records = []
        for index, cid in enumerate(self.ids):
            turn = len(self.sent[cid]) + 1
            message_id = str(uuid.uuid4())
            text = f"conversation {index} turn {turn}"
            self.sent[cid].append((message_id, text))
            records.append((cid.encode(), wire_value(cid, text), [("uuid", message_id.encode())]))
        run(produce(self.bootstrap, self.topic, records))
        return turn

    def read_replies(self, timeout: float = 240.0) -> None:
        """Wait until every message sent has a reply; each one exactly once, in order."""
        wanted = sum(len(messages) for messages in self.sent.values())
        keys = {cid.encode() for cid in self.ids}

        def ai_records(records: list) -> list:
            return [r for r in records if r.key in keys and role(r.value) == "AI"]

        records = run(
            consume(
                self.bootstrap,
                self.topic,
                until=lambda rs: len(ai_records(rs)) >= wanted,
                timeout=timeout,
                settle=2.0,
            )
        )
        by_message: dict[str, list[str]] = {}
        for record in ai_records(records):
            in_reply_to = dict(record.headers)["in-reply-to"].decode()
            by_message.setdefault(in_reply_to, []).append(json.loads(record.value)["text"])
        duplicates = {m: texts for m, texts in by_message.items() if len(texts) > 1}
        assert not duplicates, f"messages answered more than once: {duplicates}"
        self.replies = {
            cid: [by_message[message_id][0] for message_id, _ in self.sent[cid]] for cid in self.ids
        }

    def expected_reply(self, cid: str, turn: int) -> str:
        """The stand-in's echo for ``turn``: every earlier turn, then the new message."""
        lines = []
        earlier = zip(self.sent[cid][: turn - 1], self.replies[cid][: turn - 1], strict=True)
        for (_, text), reply in earlier:
            lines += [f"human: {text}", f"ai: {reply}"]
        return "\n".join([*lines, f"human: {self.sent[cid][turn - 1][1]}"])

    def check_turn(self, turn: int) -> None:
        for cid in self.ids:
            assert self.replies[cid][turn - 1] == self.expected_reply(cid, turn), cid

    def check_views(self, worker_url: str) -> None:
        for cid in self.ids:
            status, body = get(f"{worker_url}/conversations/{cid}/")
            assert status == 200, (worker_url, cid, body)
            assert isinstance(body, dict)
            expected = []
            for (message_id, text), reply in zip(self.sent[cid], self.replies[cid], strict=True):
                expected += [("human", text, message_id), ("AI", reply, None)]
            assert body["total_turns"] == len(expected)
            got = [(t["role"], t["text"], t["message_id"]) for t in body["turns"]]
            assert [(role, text) for role, text, _ in got] == [(r, t) for r, t, _ in expected]
            assert [m for _, _, m in got][::2] == [m for _, _, m in expected][::2]


def role(value: bytes | None) -> str | None:
    try:
        return json.loads(value)["role"] if value is not None else None
    except (ValueError, KeyError, TypeError):
        return None


def answered(worker) -> float:
    return counter(worker.url, "marvin_messages_total", outcome="answered")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_two_workers_share_the_load_and_survive_each_other(start_worker, worker_env, guarantee):
    settings = {
        "MARVIN_PARTITIONS": str(PARTITIONS),
        "MARVIN_STANDBY_REPLICAS": "1",
        "MARVIN_PROCESSING_GUARANTEE": guarantee,
    }
    first = start_worker(**settings)
    second = start_worker(**settings)
    assert first.data_dir != second.data_dir and first.web_port != second.web_port
    chats = Conversations({**worker_env, **settings})

    # Two turns with both workers up: the partitions are shared between them.
    for turn in (1, 2):
        chats.send_turn()
        chats.read_replies()
        chats.check_turn(turn)
    shares = answered(first), answered(second)
    assert sum(shares) == 2 * CONVERSATIONS and min(shares) > 0, shares

    # One worker stops (SIGTERM): the survivor takes every partition and the whole history.
    second.stop()
    assert second.process is not None and second.process.returncode == 0, second.tail()
    before = answered(first)
    chats.send_turn()
    chats.read_replies()
    chats.check_turn(3)
    assert answered(first) - before == CONVERSATIONS

    # It comes back on its own state: still every answer with its full history.
    back = start_worker(data_dir=second.data_dir, **settings)
    chats.send_turn()
    chats.read_replies()
    chats.check_turn(4)

    # Every conversation's view is the same from either worker, whichever owns the key.
    for worker in (first, back):
        chats.check_views(worker.url)
