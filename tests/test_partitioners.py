"""Where each client family puts a key, checked against the real clients."""

from __future__ import annotations

import uuid
import zlib

import pytest
from aiokafka.partitioner import DefaultPartitioner

from marvin_faust.partitioners import crc32_partitioner, murmur2_partitioner
from tests.traffic import ChatProducer
from tests.verifier import human_message
from tests.worker_fixtures import run

PARTITIONS = [0, 1, 2, 3]
KEYS = [str(uuid.UUID(int=i * 7919)).encode() for i in range(200)] + [b"a", b"conversation"]


def test_murmur2_is_aiokafkas_default():
    aiokafka = DefaultPartitioner()
    for key in KEYS:
        assert murmur2_partitioner(key, PARTITIONS, PARTITIONS) == aiokafka(
            key, PARTITIONS, PARTITIONS
        )


def test_crc32_is_the_keys_crc32_modulo_the_partition_count():
    for key in KEYS:
        assert crc32_partitioner(key, PARTITIONS, PARTITIONS) == zlib.crc32(key) % 4
    # The two disagree often: that is what made a librdkafka front end stall the worker.
    differ = sum(
        crc32_partitioner(k, PARTITIONS, PARTITIONS)
        != murmur2_partitioner(k, PARTITIONS, PARTITIONS)
        for k in KEYS
    )
    assert differ > len(KEYS) // 2


@pytest.mark.parametrize(
    ("partitioner", "key"),
    [(crc32_partitioner, None), (crc32_partitioner, b""), (murmur2_partitioner, None)],
)
def test_a_missing_key_goes_to_a_random_available_partition(partitioner, key):
    chosen = {partitioner(key, PARTITIONS, [2, 3]) for _ in range(50)}
    assert chosen == {2, 3}


@pytest.mark.kafka
@pytest.mark.parametrize(
    ("family", "partitioner"),
    [("librdkafka", crc32_partitioner), ("aiokafka", murmur2_partitioner)],
)
def test_each_client_family_places_keys_as_its_partitioner_says(kafka_broker, family, partitioner):
    topic = f"placement-{uuid.uuid4().hex[:8]}"
    run(create_topic(kafka_broker.bootstrap_servers, topic, len(PARTITIONS)))
    messages = [human_message(str(uuid.uuid4()), "where do I land?") for _ in range(100)]

    async def send() -> dict[str, int]:
        async with ChatProducer(family, kafka_broker.bootstrap_servers, topic) as producer:
            await producer.send(messages)
        return producer.partitions

    landed = run(send())
    for m in messages:
        assert landed[m.message_id] == partitioner(m.cid.encode(), PARTITIONS, PARTITIONS)


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, replication_factor=1)])
    finally:
        await admin.close()
