"""The baselines: a bare aiokafka consume-produce loop doing the worker's hop, nothing else.

It reads the chat topic in a consumer group, skips the bot's own records, "thinks" for the
stand-in's latency (``asyncio.sleep``), and produces the reply record (same key, ``uuid`` and
``in-reply-to`` headers) to the same topic. No Faust, no table, no history, no validation
beyond ``json.loads``: the difference between the worker and this loop is what Faust, the
table and our agent cost.

Two modes, one per processing guarantee of the worker:

- ``at_least_once``: replies handed to the producer (not awaited, as Faust sends), offsets
  auto-committed;
- ``exactly_once``: each fetched batch in one Kafka transaction (replies + the batch's offsets,
  committed before the next fetch), the least a consume-produce loop must do for exactly-once.

Run as its own process, like the worker: ``python -m bench.bare_loop BOOTSTRAP TOPIC GROUP
LATENCY MODE``; it prints ``READY`` once it owns the topic's partitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.structs import TopicPartition

READY_LINE = "READY"
# A read_committed fetch that finds nothing visible yet can be held by the broker this long:
# at aiokafka's 500 ms default the transactional loop's overhead p99 was 0.6 s here (0.15 s at
# 10 ms). A baseline should be the strong one.
FETCH_MAX_WAIT_MS = 10
MODES = ("at_least_once", "exactly_once")


class _Assigned(ConsumerRebalanceListener):
    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def on_partitions_revoked(self, revoked: object) -> None:
        pass

    async def on_partitions_assigned(self, assigned: object) -> None:
        self.event.set()


def reply_to(record: object) -> tuple[bytes, list[tuple[str, bytes]]] | None:
    """The reply record's value and headers, or None for the bot's own records."""
    document = json.loads(record.value)  # type: ignore[attr-defined]
    if document.get("role") == "AI":
        return None
    reply = {
        **document,
        "role": "AI",
        "text": f"human: {document['text']}",
        "Timestamp": time.time_ns(),
    }
    message_id = dict(record.headers).get("uuid", b"")  # type: ignore[attr-defined]
    headers = [("uuid", str(uuid.uuid4()).encode()), ("in-reply-to", message_id)]
    return json.dumps(reply, separators=(",", ":")).encode(), headers


async def loop(bootstrap: str, topic: str, group: str, latency: float, mode: str) -> None:
    transactional = mode == "exactly_once"
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="latest",
        enable_auto_commit=not transactional,
        isolation_level="read_committed" if transactional else "read_uncommitted",
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        transactional_id=f"{group}-tx" if transactional else None,
    )
    assigned = _Assigned()
    await producer.start()
    await consumer.start()
    consumer.subscribe([topic], listener=assigned)
    try:
        await assigned.event.wait()
        # Fix the positions now (the end of each partition), so nothing sent after READY is
        # skipped by a lazily resolved "latest".
        for tp in consumer.assignment():
            await consumer.position(tp)
        print(READY_LINE, flush=True)
        while True:
            batch = await consumer.getmany(timeout_ms=1000)
            if not batch:
                continue
            if transactional:
                async with producer.transaction():
                    await _answer(producer, topic, batch, latency)
                    offsets = {
                        TopicPartition(tp.topic, tp.partition): records[-1].offset + 1
                        for tp, records in batch.items()
                    }
                    await producer.send_offsets_to_transaction(offsets, group)
            else:
                await _answer(producer, topic, batch, latency)
    finally:
        await consumer.stop()
        await producer.stop()


async def _answer(producer: AIOKafkaProducer, topic: str, batch: dict, latency: float) -> None:
    for records in batch.values():
        for record in records:
            reply = reply_to(record)
            if reply is None:
                continue
            if latency:
                await asyncio.sleep(latency)
            value, headers = reply
            await producer.send(topic, key=record.key, value=value, headers=headers)


def main() -> None:
    bootstrap, topic, group, latency, mode = sys.argv[1:6]
    if mode not in MODES:
        raise SystemExit(f"mode must be one of {MODES}")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(loop(bootstrap, topic, group, float(latency), mode))


if __name__ == "__main__":
    main()
