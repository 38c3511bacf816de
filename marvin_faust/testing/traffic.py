"""Chat traffic the way front ends really write it, from the two client families people use.

- ``aiokafka``: murmur2 keys, as the Java client and Faust place them;
- ``librdkafka``: confluent-kafka with its defaults, the client under Quix Streams (the seed's
  front end): ``consistent_random``, CRC32 keys.

Replies are read ``read_committed``, as a front end must (an aborted attempt is no reply).

confluent-kafka (in the ``test`` extra) is imported only when a ``librdkafka`` producer starts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from ..models import CONTROL_HEADER, MESSAGE_ID_HEADER
from .verifier import Sent

if TYPE_CHECKING:
    from confluent_kafka import Producer as LibrdkafkaProducer

FAMILIES = ("aiokafka", "librdkafka")
# The worker setting that routes views as each family places keys.
PARTITIONER_OF = {"aiokafka": "murmur2", "librdkafka": "crc32"}


def headers_of(message: Sent) -> list[tuple[str, bytes]]:
    headers = [(MESSAGE_ID_HEADER, message.message_id.encode())]
    if message.control is not None:
        headers.append((CONTROL_HEADER, message.control.encode()))
    return headers


class ChatProducer:
    """Sends :class:`Sent` messages keyed by conversation id with their ``uuid`` header, and
    remembers the partition each one landed on."""

    def __init__(self, family: str, bootstrap: str, topic: str) -> None:
        if family not in FAMILIES:
            raise ValueError(f"unknown client family {family!r}")
        self.family, self.bootstrap, self.topic = family, bootstrap, topic
        self.partitions: dict[str, int] = {}  # message id -> partition
        self._aiokafka: AIOKafkaProducer | None = None
        self._librdkafka: LibrdkafkaProducer | None = None

    async def __aenter__(self) -> ChatProducer:
        if self.family == "aiokafka":
            self._aiokafka = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
            await self._aiokafka.start()
        else:  # every librdkafka default, as a Quix Streams or confluent-kafka app has them
            from confluent_kafka import Producer as LibrdkafkaProducer

            self._librdkafka = LibrdkafkaProducer({"bootstrap.servers": self.bootstrap})
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._aiokafka is not None:
            await self._aiokafka.stop()
        if self._librdkafka is not None:
            await asyncio.to_thread(self._librdkafka.flush, 30)

    async def send(self, messages: Iterable[Sent]) -> None:
        """Send ``messages`` in order and wait until the broker has them all."""
        messages = list(messages)
        if self._aiokafka is not None:
            futures = [
                await self._aiokafka.send(
                    self.topic,
                    key=m.cid.encode(),
                    value=m.value,
                    headers=headers_of(m),
                )
                for m in messages
            ]
            for m, metadata in zip(messages, await asyncio.gather(*futures), strict=True):
                self.partitions[m.message_id] = metadata.partition
            return
        assert self._librdkafka is not None
        errors: list[str] = []

        def delivered(error, record, message_id: str) -> None:
            if error is not None:
                errors.append(str(error))
            else:
                self.partitions[message_id] = record.partition()

        for m in messages:
            self._librdkafka.produce(
                self.topic,
                key=m.cid.encode(),
                value=m.value,
                headers=headers_of(m),
                on_delivery=lambda e, r, mid=m.message_id: delivered(e, r, mid),
            )
            self._librdkafka.poll(0)
        left = await asyncio.to_thread(self._librdkafka.flush, 30)
        if errors or left:
            from confluent_kafka import KafkaException

            raise KafkaException(f"{len(errors)} failed, {left} undelivered: {errors[:3]}")


@dataclass
class ReplyReader:
    """Reads the reply topic ``read_committed`` from its start; ``replies`` maps a message id
    to the AI records that name it in ``in-reply-to``."""

    bootstrap: str
    topic: str
    replies: dict[str, list[dict]] = field(default_factory=dict)
    _consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> ReplyReader:
        self._consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._consumer is not None
        await self._consumer.stop()

    async def wait_for(self, message_ids: Iterable[str], timeout: float) -> bool:
        """Read until every one of ``message_ids`` has a reply; False after ``timeout`` s."""
        assert self._consumer is not None
        wanted = set(message_ids)
        deadline = time.monotonic() + timeout
        while not wanted <= self.replies.keys():
            if time.monotonic() > deadline:
                return False
            batch = await self._consumer.getmany(timeout_ms=100)
            for records in batch.values():
                for record in records:
                    headers = {k: v.decode(errors="replace") for k, v in record.headers}
                    if "in-reply-to" in headers:
                        value = json.loads(record.value)
                        self.replies.setdefault(headers["in-reply-to"], []).append(value)
        return True


@dataclass
class OneInFlight:
    """Figures of :func:`one_in_flight`: the seconds from send to visible reply of each."""

    latencies: list[float] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)


async def one_in_flight(
    producer: ChatProducer, reader: ReplyReader, messages: list[Sent], timeout: float = 10.0
) -> OneInFlight:
    """Send one message at a time, the next as soon as the reply to the last one is visible,
    as a person typing in many chat windows does. A message with no reply within ``timeout``
    is noted and the run goes on."""
    result = OneInFlight()
    for m in messages:
        started = time.monotonic()
        await producer.send([m])
        if await reader.wait_for([m.message_id], timeout):
            result.latencies.append(time.monotonic() - started)
        else:
            result.unanswered.append(m.message_id)
    return result


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")
