"""Checks the reliability promise against what is really in Kafka.

Every valid human message gets exactly one reply, every conversation's stored history equals the
fold of the log, every bad message is dead-lettered once with its reason.

The verifier reads the chat topic, the dead-letter topic and the table's changelog with
``read_committed`` (aborted transactions are not part of the log), so it sees what any consumer
sees.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer

from ..models import FORGET, make_forget
from .kafka import changelog_topic, wire_value


@dataclass(frozen=True)
class Sent:
    cid: str
    message_id: str
    value: bytes | None
    valid: bool  # a human message the worker must answer; else it must dead-letter it
    control: str | None = None  # the marvin-control header: neither answered nor dead-lettered


@dataclass
class Report:
    sent_valid: int = 0
    sent_bad: int = 0
    answered: int = 0
    duplicates: int = 0
    lost: list[str] = field(default_factory=list)
    dead_lettered: int = 0
    bad_dead_lettered_twice: int = 0
    bad_not_dead_lettered: list[str] = field(default_factory=list)
    valid_dead_lettered: list[str] = field(default_factory=list)
    history_mismatches: list[str] = field(default_factory=list)
    forgets: int = 0

    @property
    def ok(self) -> bool:
        return not self.duplicates and self.ok_but_duplicates

    @property
    def ok_but_duplicates(self) -> bool:
        """What at_least_once promises after a crash: nothing lost, a message maybe answered
        twice (the stored history then holds the later reply)."""
        return not (
            self.lost
            or self.bad_dead_lettered_twice
            or self.bad_not_dead_lettered
            or self.valid_dead_lettered
            or self.history_mismatches
        )

    def summary(self) -> str:
        return (
            f"sent {self.sent_valid} valid + {self.sent_bad} bad"
            + (f" + {self.forgets} forgets" if self.forgets else "")
            + f"; replies {self.answered}; "
            f"duplicates {self.duplicates}; lost {len(self.lost)}; "
            f"dead-lettered {self.dead_lettered} (bad twice {self.bad_dead_lettered_twice}, "
            f"bad missing {len(self.bad_not_dead_lettered)}, "
            f"valid {len(self.valid_dead_lettered)}); "
            f"history mismatches {len(self.history_mismatches)}"
        )


def human_message(cid: str, text: str) -> Sent:
    return Sent(cid, str(uuid.uuid4()), wire_value(cid, text), valid=True)


def forget_message(cid: str) -> Sent:
    """A forget record for ``cid``: the history after it is the fold of what follows it."""
    return Sent(cid, str(uuid.uuid4()), make_forget(cid).to_bytes(), valid=False, control=FORGET)


def conversation_messages(conversations: int, per_conversation: int) -> list[Sent]:
    """``per_conversation`` messages in each of ``conversations`` new conversations, round
    robin over them: their turns interleave, as many people's do."""
    cids = [str(uuid.uuid4()) for _ in range(conversations)]
    return [
        human_message(cid, f"message {i} of {cid[:8]}")
        for i in range(per_conversation)
        for cid in cids
    ]


async def read_all(bootstrap: str, topic: str, idle: float = 2.0) -> list:
    """Every committed record of ``topic``, read until nothing new arrives for ``idle`` s."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    records: list = []
    try:
        last_new = time.monotonic()
        while time.monotonic() - last_new < idle:
            batch = await consumer.getmany(timeout_ms=200)
            for messages in batch.values():
                records.extend(messages)
                last_new = time.monotonic()
    finally:
        await consumer.stop()
    return records


def _headers(record) -> dict[str, str]:
    return {k: v.decode(errors="replace") for k, v in record.headers}


async def replies_by_message(bootstrap: str, topic: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for record in await read_all(bootstrap, topic):
        headers = _headers(record)
        if "in-reply-to" in headers:
            out[headers["in-reply-to"]].append(json.loads(record.value))
    return out


async def verify(
    bootstrap: str, env: dict[str, str], sent: list[Sent], *, duplicated: set[str] = frozenset()
) -> Report:
    """Check the promise for ``sent`` (in send order); ``duplicated`` ids were sent twice."""
    report = Report(
        sent_valid=len({s.message_id for s in sent if s.valid}),
        sent_bad=sum(not s.valid and s.control is None for s in sent),
        forgets=sum(s.control == FORGET for s in sent),
    )
    replies = await replies_by_message(bootstrap, env["MARVIN_TOPIC"])
    letters = await read_all(bootstrap, env["MARVIN_DEAD_LETTER_TOPIC"])
    lettered = Counter(_headers(r).get("uuid") for r in letters)
    report.dead_lettered = len(letters)
    seen: set[str] = set()
    for s in sent:
        if s.message_id in seen or s.control is not None:
            continue
        seen.add(s.message_id)
        if s.valid:
            count = len(replies.get(s.message_id, []))
            report.answered += min(count, 1)
            report.duplicates += max(count - 1, 0)
            if count == 0:
                report.lost.append(s.message_id)
            if lettered.get(s.message_id):
                report.valid_dead_lettered.append(s.message_id)
        else:
            count = lettered.get(s.message_id, 0)
            if count == 0:
                report.bad_not_dead_lettered.append(s.message_id)
            report.bad_dead_lettered_twice += max(count - 1, 0)

    changelog = changelog_topic(env["MARVIN_APP_ID"])
    stored: dict[str, list] = {}
    for record in await read_all(bootstrap, changelog):
        stored[record.key.decode()] = json.loads(record.value) if record.value else []
    for cid in {s.cid for s in sent if s.valid}:
        expected = []
        for s in sent:
            if s.cid == cid and s.control == FORGET:
                expected = []
            elif s.cid == cid and s.valid and s.message_id not in {e[2] for e in expected}:
                # A message answered twice (at_least_once) is stored with the later reply.
                [*_, reply] = replies.get(s.message_id) or [None]
                if reply is not None:
                    text = json.loads(s.value)["text"]
                    expected.append(("human", text, s.message_id))
                    expected.append(("AI", reply["text"], None))
        got = [
            (t["role"], t["text"], t["message_id"] if t["role"] == "human" else None)
            for t in stored.get(cid, [])
        ]
        if got != expected:
            report.history_mismatches.append(cid)
    return report
