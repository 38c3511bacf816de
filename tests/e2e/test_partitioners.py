"""Where each client family puts a key, checked against the real clients on the real broker."""

from __future__ import annotations

import uuid

import pytest

from marvin_faust.partitioners import crc32_partitioner, murmur2_partitioner
from marvin_faust.testing.kafka import create_topic, run
from marvin_faust.testing.traffic import ChatProducer
from marvin_faust.testing.verifier import human_message

PARTITIONS = [0, 1, 2, 3]


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
