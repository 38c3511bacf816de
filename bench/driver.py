"""The front end's side of every measurement: a producer of one of the two client families
writing human records in the wire format, and a consumer matching each reply to its message by
the ``in-reply-to`` header. The same driver talks to the worker and to the bare baseline loop.

Families: ``aiokafka`` (murmur2 keys, as the Java client) and ``librdkafka`` (confluent-kafka
with its defaults, the client under Quix Streams: CRC32 keys).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from confluent_kafka import Producer as LibrdkafkaProducer

from marvin_faust.models import (
    IN_REPLY_TO_HEADER,
    MESSAGE_ID_HEADER,
    header_value,
    make_message,
    new_message_id,
)
from marvin_faust.testing.traffic import FAMILIES

TOPIC_WAIT_SECONDS = 60.0


@dataclass(frozen=True)
class Reply:
    sent_at: float  # perf_counter() just before the human record was handed to the producer
    received_at: float  # perf_counter() when the reply was read
    value: dict

    @property
    def seconds(self) -> float:
        return self.received_at - self.sent_at


class Driver:
    """``async with Driver(bootstrap, topic) as d: reply = await d.ask(cid, text)``.

    The reply consumer has no group and starts at the end of the topic, so it sees every reply
    produced after ``__aenter__``. ``isolation_level="read_committed"`` hides replies of
    transactions not yet committed (what a careful front end of an exactly-once worker sees).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        isolation_level: str = "read_uncommitted",
        family: str = "aiokafka",
    ) -> None:
        if family not in FAMILIES:
            raise ValueError(f"unknown producer family {family!r}; choose from {FAMILIES}")
        self.topic = topic
        # The aiokafka producer also answers the metadata call of _listen_from_end.
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        self.librdkafka = (
            LibrdkafkaProducer({"bootstrap.servers": bootstrap, "linger.ms": 0})
            if family == "librdkafka"
            else None
        )
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            isolation_level=isolation_level,
        )
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._sent_at: dict[str, float] = {}
        self._reader: asyncio.Task[None] | None = None
        self.replies_seen = 0

    async def __aenter__(self) -> Driver:
        await self.producer.start()
        await self.consumer.start()
        await self._listen_from_end()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.producer.stop()
        await self.consumer.stop()
        if self.librdkafka is not None:
            await asyncio.to_thread(self.librdkafka.flush, 30)

    async def _listen_from_end(self) -> None:
        # The producer's metadata call waits for the topic (which the worker or the bench has
        # created with its partitions before any driver starts).
        partitions = await asyncio.wait_for(
            self.producer.partitions_for(self.topic), TOPIC_WAIT_SECONDS
        )
        assigned = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self.consumer.assign(assigned)
        await self.consumer.seek_to_end(*assigned)
        for tp in assigned:
            await self.consumer.position(tp)

    async def _read(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for records in batch.values():
                for record in records:
                    message_id = header_value(record.headers, IN_REPLY_TO_HEADER)
                    future = self._pending.pop(message_id, None) if message_id else None
                    if future is None or future.done():
                        continue
                    self.replies_seen += 1
                    future.set_result(
                        Reply(self._sent_at.pop(message_id), now, json.loads(record.value))
                    )

    async def send(self, cid: str, text: str) -> asyncio.Future[Reply]:
        """Hand one human record to the producer; the future resolves with its reply."""
        message_id = new_message_id()
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = future
        self._sent_at[message_id] = time.perf_counter()
        key, value = cid.encode(), make_message(cid, "human", text).to_bytes()
        headers = [(MESSAGE_ID_HEADER, message_id.encode())]
        if self.librdkafka is not None:
            self.librdkafka.produce(self.topic, key=key, value=value, headers=headers)
            self.librdkafka.poll(0)  # serves delivery reports; librdkafka sends from its thread
        else:
            await self.producer.send(self.topic, key=key, value=value, headers=headers)
        return future

    async def ask(self, cid: str, text: str, timeout: float = 120.0) -> Reply:
        """Send and wait for the reply (the producer does not linger: it goes out at once)."""
        future = await self.send(cid, text)
        return await asyncio.wait_for(future, timeout)

    async def flush(self) -> None:
        await self.producer.flush()
        if self.librdkafka is not None:
            await asyncio.to_thread(self.librdkafka.flush, 30)
