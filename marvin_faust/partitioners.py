"""Where a keyed record lands: the partitioners of the Kafka clients that write the chat topic.

Kafka clients do not agree. The Java client, aiokafka and Faust hash a key with murmur2;
librdkafka, and so confluent-kafka, Quix Streams and every other librdkafka binding, defaults to
``consistent_random``: CRC32 of the key. The same conversation id lands on different partitions
depending on who wrote it. The worker never relies on either for its replies (it answers on the
partition the message came from); ``MARVIN_PARTITIONER`` names the fleet's producers so that a
conversation view is routed to the worker that owns the partition its messages land on, and so
that this project's own clients place keys as the rest of the fleet does.

Each partitioner has aiokafka's signature: ``(key bytes or None, all partitions, available
partitions) -> partition``.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence
from typing import Literal

from aiokafka.partitioner import DefaultPartitioner

Partitioner = Callable[[bytes | None, Sequence[int], Sequence[int]], int]
PartitionerName = Literal["murmur2", "crc32"]


# aiokafka's own: the partitioner Faust uses unless told otherwise.
murmur2_partitioner: Partitioner = DefaultPartitioner()


def crc32_partitioner(
    key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]
) -> int:
    """librdkafka's ``consistent_random``: CRC32 of a non-empty key, a random one without."""
    if not key:
        return random.choice(list(available) or list(all_partitions))
    return sorted(all_partitions)[zlib.crc32(key) % len(all_partitions)]


PARTITIONERS: dict[str, Partitioner] = {
    "murmur2": murmur2_partitioner,
    "crc32": crc32_partitioner,
}


def partitioner_named(name: PartitionerName) -> Partitioner:
    return PARTITIONERS[name]
