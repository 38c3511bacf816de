"""Kafka for tests and the bench: a throw-away local broker, and a plain Kafka client that
writes and reads the chat topic as an existing front end would (the wire format, no project
client code).

The brokers share one jars dir (:func:`shared_jars`), so the jars download once.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from marvin_faust.partitioners import Partitioner, murmur2_partitioner

from .ports import LOOPBACK, free_ports

if TYPE_CHECKING:
    from marvin_faust.broker import LocalBroker

# The directory above the package: the repo, when the package runs from a checkout (an editable
# install or PYTHONPATH), as the tests and the bench do.
CHECKOUT = Path(__file__).resolve().parents[2]


def shared_jars() -> Path:
    """``$MARVIN_KAFKA_JARS``, else the checkout's ``.kafka/lib`` (``make run``'s broker's)."""
    return Path(os.environ.get("MARVIN_KAFKA_JARS") or CHECKOUT / ".kafka" / "lib")


# -- The local broker ------------------------------------------------------------------------


def make_broker(home: Path, jars_dir: Path | None = None) -> LocalBroker:
    """A ``LocalBroker`` (not started) in ``home`` on two free loopback ports."""
    from marvin_faust.broker import BrokerConfig, LocalBroker

    port, controller_port = free_ports(2)
    config = BrokerConfig(
        host=LOOPBACK,
        port=port,
        controller_port=controller_port,
        home=home,
        jars_dir=jars_dir or shared_jars(),
    )
    return LocalBroker(config)


def start_broker(home: Path, timeout: float = 120.0, attempts: int = 3) -> LocalBroker:
    """A started :func:`make_broker` broker; a port taken between choosing and binding it is
    chosen again (``attempts`` times in all)."""
    from marvin_faust.broker import BrokerError

    for attempt in range(attempts):
        broker = make_broker(home)
        try:
            broker.start(timeout=timeout)
            return broker
        except BrokerError as exc:
            if "already in use" not in str(exc) or attempt == attempts - 1:
                raise
    raise ValueError(f"attempts must be at least 1 (got {attempts})")


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, replication_factor=1)])
    finally:
        await admin.close()


# -- A plain Kafka client, as an existing front end would be ----------------------------------


def bootstrap_of(env: dict[str, str]) -> str:
    """The bootstrap servers of a worker's settings (``MARVIN_BROKER=kafka://host:port``)."""
    return env["MARVIN_BROKER"].removeprefix("kafka://")


def changelog_topic(app_id: str) -> str:
    """The history table's changelog topic, as Faust names it: ``<app id>-<table>-changelog``."""
    return f"{app_id}-conversation-history-changelog"


def one_conversation_per_partition(
    partitions: int, partitioner: Partitioner = murmur2_partitioner
) -> list[str]:
    """Conversation ids that ``partitioner`` (aiokafka's murmur2) puts on partitions 0, 1, ..."""
    every = list(range(partitions))
    found: dict[int, str] = {}
    while len(found) < partitions:
        cid = str(uuid.uuid4())
        found.setdefault(partitioner(cid.encode(), every, every), cid)
    return [found[p] for p in every]


def wire_value(cid: str, text: str, role: str = "human") -> bytes:
    """A chat record's value in the wire format, the conversation id as its ``uuid``."""
    return json.dumps(
        {
            "uuid": cid,
            "role": role,
            "text": text,
            "conversation_id": cid,
            "Timestamp": time.time_ns(),
        }
    ).encode()


async def produce(bootstrap: str, topic: str, records: list[tuple]) -> None:
    """Send ``(key, value[, headers])`` records in order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for key, value, *headers in records:
            await producer.send_and_wait(
                topic, key=key, value=value, headers=headers[0] if headers else None
            )
    finally:
        await producer.stop()


async def consume(
    bootstrap: str,
    topic: str,
    until,
    timeout: float = 60.0,
    settle: float = 0.0,
    isolation_level: str = "read_committed",  # aborted transactions are not replies
) -> list:
    """Read ``topic`` from the start until ``until(records)`` is true, then ``settle`` s more."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        isolation_level=isolation_level,
    )
    await consumer.start()
    records: list = []
    try:
        deadline = time.monotonic() + timeout
        done_at: float | None = None
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for messages in batch.values():
                records.extend(messages)
            if done_at is None and until(records):
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - done_at >= settle:
                return records
        raise AssertionError(f"timed out after {timeout}s with {len(records)} records on {topic}")
    finally:
        await consumer.stop()


def replies_for(records: list, cid: str) -> list[dict]:
    """The AI records of conversation ``cid`` (poison records on the topic are skipped)."""
    out = []
    for record in records:
        if record.key != cid.encode() or record.value is None:
            continue
        try:
            value = json.loads(record.value)
        except ValueError:
            continue
        if isinstance(value, dict) and value.get("role") == "AI":
            out.append({"value": value, "headers": dict(record.headers)})
    return out


def ask(env: dict, cid: str, text: str, expected_replies: int, message_id: str | None = None):
    """Produce one human record in the wire format on the chat topic of the worker settings
    ``env`` and wait for the conversation's replies (:func:`replies_for`)."""
    bootstrap = bootstrap_of(env)
    headers = [("uuid", (message_id or str(uuid.uuid4())).encode())]
    run(produce(bootstrap, env["MARVIN_TOPIC"], [(cid.encode(), wire_value(cid, text), headers)]))
    records = run(
        consume(
            bootstrap,
            env["MARVIN_TOPIC"],
            until=lambda rs: len(replies_for(rs, cid)) >= expected_replies,
            settle=1.0,
        )
    )
    return replies_for(records, cid)


def run(coro):
    """``asyncio.run``: the helpers above are coroutines, the tests plain functions."""
    return asyncio.run(coro)


# -- Topic state: configuration and latest values --------------------------------------------


async def topic_config(bootstrap: str, topic: str) -> dict[str, str]:
    """The topic's configuration as the broker reports it (every entry, defaults too)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    [resource] = response.resources
    # (error code, error message, type, name, entries); entries: (name, value, ...)
    return {entry[0]: entry[1] for entry in resource[4]}


async def read_to_end(bootstrap: str, topic: str, timeout: float = 60.0) -> AsyncIterator[Any]:
    """Every committed record of ``topic`` (``read_committed``, every partition), in order per
    partition, up to the ends it has when the read starts; fails after ``timeout`` s."""
    consumer = AIOKafkaConsumer(
        topic,  # with no group: every partition
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        while not (partitions := sorted(consumer.assignment())):
            if time.monotonic() > deadline:
                raise AssertionError(f"no partitions of {topic} assigned in {timeout}s")
            await asyncio.sleep(0.1)
        ends = await consumer.end_offsets(partitions)
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic} not read to its end in {timeout}s")
            for messages in (await consumer.getmany(timeout_ms=200)).values():
                for record in messages:
                    yield record
    finally:
        await consumer.stop()


async def latest_values(bootstrap: str, topic: str, timeout: float = 60.0) -> dict[bytes, Any]:
    """Each key's latest committed value on ``topic`` (None: a tombstone), read to the end."""
    return {record.key: record.value async for record in read_to_end(bootstrap, topic, timeout)}


async def write_histories(bootstrap: str, topic: str, histories: dict[str, list]) -> None:
    """Write conversations' histories straight into the history changelog ``topic``, in the
    table's format (key: the id's bytes, value: the JSON list of turns), each on the partition
    the murmur2 partitioner gives its key, as the chat topic's."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks="all")
    await producer.start()
    try:
        for cid, turns in histories.items():
            await producer.send(topic, key=cid.encode(), value=json.dumps(turns).encode())
        await producer.flush()
    finally:
        await producer.stop()
