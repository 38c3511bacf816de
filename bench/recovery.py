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

from marvin_faust.conversation import Turn, make_turn
from marvin_faust.testing.kafka import changelog_topic, one_conversation_per_partition

from .driver import Driver
from .harness import Cluster, http_get


def stored_turns(cid: str, count: int) -> list[Turn]:
    """A conversation's history: alternating human / AI turns, distinct texts."""
    now = time.time_ns()
    return [
        make_turn(
            "human" if index % 2 == 0 else "AI",
            f"turn {index} of {cid[:8]}: some words about the weather and the futility of it",
            now + index,
            str(uuid.uuid4()),
        )
        for index in range(count)
    ]


async def fill_changelog(bootstrap: str, topic: str, cids: list[str], turns: int) -> int:
    """Write one history record per conversation; returns the bytes written."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks="all")
    await producer.start()
    written = 0
    try:
        for cid in cids:
            value = json.dumps(stored_turns(cid, turns), separators=(",", ":")).encode()
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "conversations": self.conversations,
            "start": self.start,
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
    baseline = RecoveryResult(0, 0, ready, answered, held, note)

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
