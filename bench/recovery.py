"""Recovery: a worker with an empty state directory rebuilds the history table from its
changelog, then answers the next message; then a worker restarted on the largest one's state.

The changelog is filled directly, in the table's own format: topic
``<app id>-conversation-history-changelog``, key = the conversation id's UTF-8 bytes, value =
the JSON list of turns, partition = the chat topic's for that key (the producer's default
murmur2 partitioner over the same partition count). A first worker, started on an empty
changelog, creates the topics and is the baseline. Each later worker starts with a new, empty
data dir while a human message to one recovered conversation already waits on the chat topic:
its reply (the stand-in echoes its prompt) must hold that conversation's stored turns. Last,
the worker that rebuilt the most is restarted on its own data dir after its clean stop: it
holds every history, and its own write (the reply's history, in a transaction) ends one
changelog partition.

The first worker also answers one message on every chat partition, so that the consumer group
has a committed offset everywhere before the recovery runs. Without that, a waiting message on
a partition with no committed offset yet was never answered (seen 2 times in 3 full runs: the
worker's fetcher read it while the table was still recovering, and Faust's seek to the
committed offsets afterwards left that partition alone); that is a defect of its own, not a
recovery time.

Retention (:func:`retention`): the same recovery over 10,000 conversations of which 90% have
expired. They are written with turns two hours old (the rest a minute old), a worker with a
one-hour ``MARVIN_CONVERSATION_TTL`` deletes them the way it does in production (expiry records,
then tombstones in the changelog), and a fresh worker recovers twice: before the broker has
compacted the changelog (every value and every tombstone still there), and after (the
changelog's compaction forced with small ``segment.ms``, ``max.compaction.lag.ms`` and
``delete.retention.ms``, a record appended to roll the active segment, which is never compacted).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from marvin_faust.conversation import Turn, make_turn
from marvin_faust.testing.kafka import (
    changelog_topic,
    one_conversation_per_partition,
    read_to_end,
)
from marvin_faust.testing.web import counter

from .driver import Driver
from .harness import Cluster, http_get


def stored_turns(cid: str, count: int, age_seconds: float = 0.0) -> list[Turn]:
    """A conversation's history: alternating human / AI turns, distinct texts, the newest
    ``age_seconds`` old."""
    now = time.time_ns() - int(age_seconds * 1e9) - count
    return [
        make_turn(
            "human" if index % 2 == 0 else "AI",
            f"turn {index} of {cid[:8]}: some words about the weather and the futility of it",
            now + index,
            str(uuid.uuid4()),
        )
        for index in range(count)
    ]


async def fill_changelog(
    bootstrap: str, topic: str, cids: list[str], turns: int, age_seconds: float = 0.0
) -> int:
    """Write one history record per conversation; returns the bytes written."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks="all")
    await producer.start()
    written = 0
    try:
        for cid in cids:
            history = stored_turns(cid, turns, age_seconds)
            value = json.dumps(history, separators=(",", ":")).encode()
            written += len(value)
            await producer.send(topic, key=cid.encode(), value=value)
        await producer.flush()
    finally:
        await producer.stop()
    return written


@dataclass
class RecoveryResult:
    conversations: int
    changelog_bytes: int
    seconds_to_ready_line: float
    seconds_to_answer: float | None  # None: no answer within the wait
    history_recovered: bool
    note: str = ""
    start: str = "empty data dir"
    case: str = "all live"
    records: Records | None = None  # what the changelog held (retention cases)

    def as_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "conversations": self.conversations,
            "start": self.start,
            "changelog_values": None if self.records is None else self.records.values,
            "changelog_tombstones": None if self.records is None else self.records.tombstones,
            "changelog_mib": round(self.changelog_bytes / 2**20, 2),
            "seconds_to_ready_line": round(self.seconds_to_ready_line, 2),
            "seconds_to_answer": None
            if self.seconds_to_answer is None
            else round(self.seconds_to_answer, 2),
            "history_recovered": self.history_recovered,
            "note": self.note,
        }


def start_and_ask(
    cluster: Cluster,
    env: dict[str, str],
    name: str,
    cid: str,
    expect: str | None,
    answer_wait: float,
    also_ask: tuple[str, ...] = (),
    data_dir: Path | None = None,
) -> tuple[float, float | None, bool, str]:
    """Start a worker on ``data_dir`` (default: a new one) with a message to ``cid`` already
    waiting; the worker stops cleanly after.

    Returns (seconds to the Ready line, seconds to the reply or None if none came within
    ``answer_wait`` s after Ready, whether the reply holds ``expect``, a note), times from the
    moment the process is started.
    """
    worker = cluster.worker(env, name, data_dir=data_dir, wait=False)

    async def run() -> tuple[float, float | None, bool, str]:
        async with Driver(cluster.bootstrap, env["MARVIN_TOPIC"], "read_committed") as driver:
            reply_future = await driver.send(cid, "What do you remember?")
            await driver.flush()
            started = time.perf_counter()
            await asyncio.to_thread(worker.start, 600)
            ready = time.perf_counter() - started
            try:
                reply = await asyncio.wait_for(reply_future, answer_wait)
            except TimeoutError:
                _, metrics = await asyncio.to_thread(http_get, f"{worker.url}/metrics")
                received = [
                    line for line in metrics.splitlines() if line.startswith("faust_messages_rec")
                ]
                note = f"no answer {answer_wait:g} s after Ready; {'; '.join(received)}"
                return ready, None, False, note
            answered = reply.received_at - started
            for other in also_ask:  # untimed: they only make the worker commit offsets
                await driver.ask(other, "And you?", timeout=answer_wait)
        held = expect is None or expect in reply.value["text"]
        return ready, answered, held, ""

    try:
        return asyncio.run(run())
    finally:
        worker.stop()


def recovery(
    cluster: Cluster, sizes: list[int], turns: int, answer_wait: float = 120.0
) -> tuple[RecoveryResult, list[RecoveryResult]]:
    """The baseline (empty changelog) and one result per size (cumulative fills)."""
    env = cluster.app_env("recovery")
    first, *others = one_conversation_per_partition(cluster.partitions)
    ready, answered, held, note = start_and_ask(
        cluster, env, "recovery-empty", first, None, answer_wait, tuple(others)
    )
    baseline = RecoveryResult(0, 0, ready, answered, held, note, case="empty changelog")

    topic = changelog_topic(env["MARVIN_APP_ID"])
    cids: list[str] = []
    written = 0
    results = []
    data_dir = None
    for size in sorted(sizes):
        new = [str(uuid.uuid4()) for _ in range(size - len(cids))]
        written += asyncio.run(fill_changelog(cluster.bootstrap, topic, new, turns))
        cids += new
        probe = cids[len(cids) // 2]
        last_turn = stored_turns(probe, turns)[-1]["text"]
        data_dir = cluster.workdir / f"recovery-{size}-state"
        ready, answered, held, note = start_and_ask(
            cluster, env, f"recovery-{size}", probe, last_turn, answer_wait, data_dir=data_dir
        )
        results.append(RecoveryResult(size, written, ready, answered, held, note))
    if cids:
        probe = cids[len(cids) // 3]
        last_turn = stored_turns(probe, turns)[-1]["text"]
        ready, answered, held, note = start_and_ask(
            cluster, env, f"restart-{len(cids)}", probe, last_turn, answer_wait, data_dir=data_dir
        )
        results.append(
            RecoveryResult(
                len(cids), written, ready, answered, held, note, start="restart on its own"
            )
        )
    return baseline, results


# -- Retention ---------------------------------------------------------------------------------

SWEEPING = {"MARVIN_CONVERSATION_TTL": "3600", "MARVIN_EXPIRY_INTERVAL": "1"}
IDLE_AGE = 7200.0  # seconds: twice the sweeping worker's TTL
# Topic configuration that makes the broker's cleaner compact at once and drop tombstones.
COMPACT_NOW = {
    "cleanup.policy": "compact",
    "segment.ms": "1000",
    "max.compaction.lag.ms": "1000",
    "min.cleanable.dirty.ratio": "0.01",
    "delete.retention.ms": "0",
}
ROLL_KEY = b"bench-segment-roll"  # a tombstone of no conversation: appended to roll a segment


@dataclass(frozen=True)
class Records:
    values: int
    tombstones: int
    value_bytes: int
    keys_with_value: int  # keys whose latest record is a value

    @property
    def compacted(self) -> bool:
        """No value left but each key's latest."""
        return self.values == self.keys_with_value


async def changelog_records(bootstrap: str, topic: str) -> Records:
    """What a recovering worker reads on ``topic`` now (read_committed, to its end), but the
    bench's own segment rolls."""
    values = tombstones = value_bytes = 0
    latest: dict[bytes, bool] = {}
    async for record in read_to_end(bootstrap, topic, timeout=600):
        if record.key == ROLL_KEY:
            continue  # the bench's own, in no conversation
        if record.value is None:
            tombstones += 1
        else:
            values += 1
            value_bytes += len(record.value)
        latest[record.key] = record.value is not None
    return Records(values, tombstones, value_bytes, sum(latest.values()))


async def compact_now(bootstrap: str, topic: str, timeout: float) -> Records:
    """Make the broker compact ``topic`` and drop its tombstones; returns what it holds once
    it has, or after ``timeout`` s, whichever comes first. A record appended every few seconds
    rolls the active segment, which the cleaner never touches."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, COMPACT_NOW)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    deadline = time.monotonic() + timeout
    try:
        partitions = sorted(await producer.partitions_for(topic))
        while True:
            await asyncio.sleep(5.0)
            for partition in partitions:
                await producer.send_and_wait(topic, key=ROLL_KEY, value=None, partition=partition)
            held = await changelog_records(bootstrap, topic)
            if (held.compacted and not held.tombstones) or time.monotonic() > deadline:
                return held
    finally:
        await producer.stop()


def wait_expired(url: str, count: int, timeout: float) -> float:
    """Seconds until the worker at ``url`` has expired ``count`` conversations."""
    started = time.monotonic()
    while counter(url, "marvin_conversations_expired_total") < count:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"fewer than {count} conversations expired after {timeout:g} s")
        time.sleep(0.5)
    return time.monotonic() - started


def retention(
    cluster: Cluster,
    conversations: int,
    turns: int,
    expired_share: float = 0.9,
    answer_wait: float = 120.0,
    compaction_wait: float = 300.0,
) -> tuple[list[RecoveryResult], dict[str, Any]]:
    """Recovery of ``conversations`` of which ``expired_share`` expired: before and after the
    changelog is compacted (see the module doc). Also returns how the expiry went."""
    bootstrap = cluster.bootstrap
    env = cluster.app_env("retention")
    sweeping = {**env, **SWEEPING}
    first, *others = one_conversation_per_partition(cluster.partitions)
    start_and_ask(cluster, sweeping, "retention-first", first, None, answer_wait, tuple(others))
    topic = changelog_topic(env["MARVIN_APP_ID"])
    cids = [str(uuid.uuid4()) for _ in range(conversations)]
    expiring = round(conversations * expired_share)
    asyncio.run(fill_changelog(bootstrap, topic, cids[:expiring], turns, IDLE_AGE))
    asyncio.run(fill_changelog(bootstrap, topic, cids[expiring:], turns, 60.0))

    sweeper = cluster.worker(sweeping, "retention-sweep")  # recovers all, then expires
    expiry_seconds = wait_expired(sweeper.url, expiring, timeout=600.0)
    sweeper.stop()

    probe = cids[expiring + (conversations - expiring) // 2]
    last_turn = stored_turns(probe, turns)[-1]["text"]

    def recover(name: str, case: str, held: Records, note: str = "") -> RecoveryResult:
        ready, answered, found, why = start_and_ask(
            cluster, env, name, probe, last_turn, answer_wait
        )
        note = "; ".join(part for part in (note, why) if part)
        return RecoveryResult(
            conversations, held.value_bytes, ready, answered, found, note, case=case, records=held
        )

    rows = [
        recover(
            "retention-uncompacted",
            "90% expired, not compacted",
            asyncio.run(changelog_records(bootstrap, topic)),
        )
    ]
    held = asyncio.run(compact_now(bootstrap, topic, compaction_wait))
    unfinished = "" if held.compacted else f"not fully compacted after {compaction_wait:g} s"
    rows.append(recover("retention-compacted", "90% expired, compacted", held, unfinished))
    return rows, {"expired": expiring, "seconds_to_expire_all": round(expiry_seconds, 2)}
