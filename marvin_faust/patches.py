"""Two fixes to faust-streaming 0.15.3's exactly_once mode, installed by ``apply()`` before the
app is made. Without them a rebalance breaks a worker; both were seen here when one of two
workers stopped (tests/test_scale_out.py), and neither is fixed upstream.

1. Recovery highwaters. Under ``processing_guarantee="exactly_once"`` Faust's table recovery
   takes each changelog partition's highwater from aiokafka's ``last_stable_offset(tp)``, which
   aiokafka only knows once it has fetched from that partition. Right after a rebalance hands a
   worker a partition it has not fetched yet, that is None and Faust takes it as -1. With local
   state for the partition (a standby copy) the worker then crashes with ``ConsistencyError: The
   persisted offset for changelog topic partition ... is higher than the last offset in that
   topic (highwater) (8 > -1)``; without, it skips the recovery and serves an empty history.
   Reported as robinhood/faust#658. The fix asks the broker: ListOffsets from the consumer,
   which reads ``read_committed`` in a transaction, answers the last stable offset (the same
   value, in the same convention) whether or not anything was fetched yet.

2. Transactional producers of revoked partitions. On a rebalance Faust stops those, but only the
   ones the assignor does not call standby, and its assignor lists the chat partitions behind a
   standby changelog as standby too. So a worker that hands partition 0 to another keeps its
   producer for transactional id ``<app id>-1-0``; the other worker's producer fences it; when
   partition 0 comes back (the other worker stopped) Faust reuses the fenced producer, the next
   reply fails with ``ProducerFenced`` (then ``IllegalOperation: Can't send messages while not
   in transaction``) and the worker crashes. The fix also stops the producer of every revoked
   partition that is not still active here; the next owner's producer takes the id over, as
   Kafka intends.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from faust.transport.consumer import TopicPartitionGroup, TransactionManager
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.types import TP

_original_highwaters = AIOKafkaConsumerThread._highwaters
_original_on_rebalance = TransactionManager.on_rebalance


async def _highwaters_from_the_broker(
    self: AIOKafkaConsumerThread, partitions: Iterable[TP]
) -> Mapping[TP, int]:
    if not self.consumer.in_transaction:
        return await _original_highwaters(self, partitions)
    consumer: Any = self._ensure_consumer()
    return await consumer.end_offsets(list(partitions))


def _transactional_ids(manager: TransactionManager, tps: Iterable[TP]) -> set[str]:
    """The transactional ids of ``tps``, standby or not (Faust's own helper leaves standbys out)."""
    assignor = manager.app.assignor
    return {
        manager.transactional_id_format.format(
            tpg=TopicPartitionGroup(tp.topic, tp.partition, assignor.group_for_topic(tp.topic)),
            group_id=manager.app.conf.id,
        )
        for tp in tps
    }


async def _on_rebalance_stopping_revoked_producers(
    self: TransactionManager, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP]
) -> None:
    still_active = self._tps_to_transactional_ids(assigned)
    gone = sorted(_transactional_ids(self, revoked) - still_active)
    if gone:
        self.log.info("Stopping transactional producers of revoked partitions: %s", gone)
        await self._stop_transactions(gone)
    await _original_on_rebalance(self, assigned, revoked, newly_assigned)


def apply() -> None:
    """Install both fixes (idempotent)."""
    AIOKafkaConsumerThread._highwaters = _highwaters_from_the_broker  # type: ignore[method-assign]
    TransactionManager.on_rebalance = _on_rebalance_stopping_revoked_producers  # type: ignore[method-assign]
