"""Where each client family puts a key: murmur2 against the Java client's hash, and CRC32.

The real clients on a real broker are in ``tests/e2e/test_partitioners.py``.
"""

from __future__ import annotations

import uuid
import zlib

import pytest

from marvin_faust.partitioners import crc32_partitioner, murmur2_partitioner

PARTITIONS = [0, 1, 2, 3]
KEYS = [str(uuid.UUID(int=i * 7919)).encode() for i in range(200)] + [b"a", b"conversation"]


# murmur2 of a key as the Java client computes it (signed 32 bits), from Kafka's UtilsTest.
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


def test_murmur2_places_keys_as_the_java_client_does():
    for key, java_hash in JAVA_MURMUR2.items():
        # The Java client: toPositive(murmur2(key)) % numPartitions.
        assert murmur2_partitioner(key, PARTITIONS, PARTITIONS) == (java_hash & 0x7FFFFFFF) % 4


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
