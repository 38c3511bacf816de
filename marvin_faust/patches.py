"""Seven fixes to faust-streaming 0.15.3, six installed by ``apply()`` before the app is made. The
first two concern exactly_once: without them a rebalance breaks a worker; both were seen here
when one of two workers stopped (tests/test_scale_out.py). None is fixed upstream.

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

3. Partitions with no committed offset. While a rebalance or a table recovery runs, Faust's
   consumer keeps fetching and drops what it fetched; afterwards it seeks every partition back
   to its committed offset. aiokafka's ``seek_to_committed`` leaves a partition with no
   committed offset where the fetcher got to, so a message that was waiting there is skipped
   for good. Seen by the recovery bench in 2 of 3 runs: a worker starting on a non-empty
   changelog never answered a message that waited on a partition nobody had committed. The
   fix sends such stream partitions back to where ``consumer_auto_offset_reset`` says a new
   group starts: the beginning, by default. A message read twice is answered once (the agent
   skips message ids it has stored).

4. One event's records in one transaction. Faust commits on a timer, between any two awaits of
   an agent, and waits for nothing: the history write (a changelog record queued in Faust's
   producer buffer) and the reply of one message can land in two transactions. A crash or a
   rebalance between them leaves a history saying "answered" with no committed reply (the
   next worker skips the message: lost), or a committed reply whose history write was aborted
   (the message is answered again: seen once in the rebalance test, before the table writes
   were awaited). A graceful stop could also let the agent write after the stop's last commit:
   into the local RocksDB but no transaction, and the next start trusted that state (seen: 15
   and 27 of 200 messages lost over 10 SIGTERM restarts, a loss these fixes ended in every run
   since; the exact sequence was not replayed). The fix: :func:`writes_of_one_event` holds a
   lock while the agent writes one event's records; Faust's ``commit`` takes the same lock and,
   before it commits, waits until every table write made so far is delivered
   (``tables.HistoryTable.wait_written``), so it is in the transaction being committed (Faust
   itself waits for nothing here under exactly_once). Waiting once per commit, not once per
   event, lets the producer batch the writes: waiting per event cost a produce round trip per
   reply and about half the worker's throughput (A/B: 135-203 against 255-477 msg/s). Once
   the stop's final commit has begun nothing more is written (the stop cancels the agent; the
   next worker handles the message); and once it is done, Faust's commit timer commits nothing
   more (it crashed the consumer with "Not in the middle of a transaction", which made the
   stop look unclean).

5. No stale records after a seek. When a table recovery ends, Faust resumes the stream
   partitions and then seeks them to their committed offsets, with its consumer flowing. Records
   fetched before the seek (skipped by the streams, whose flow is not on yet) can still be
   handed out after it, one per await, and move Faust's read offset past the committed one;
   when the seek's own fetch brings the message at the committed offset, Faust drops it as
   already read, and its commit check lets an offset pass over exactly one unacknowledged
   message at the committed offset. Seen: after a kill -9, the message at the committed offset
   of one partition was never answered while the next ones were (1 of 300; CI once lost 20 of
   300); the sequence above is what Faust's code allows and fits the log, not a replay of it.
   The fix stops the consumer's flow for the seek, so a batch fetched before it is abandoned.

6. Acknowledgements kept for the rebalance's commit. When a rebalance revokes partitions
   (with Kafka's eager protocol: all of them), Faust first forgets which of their messages were
   acknowledged since the last commit, and only then lets the agents finish and commits. What
   the agents had answered since the last commit (up to ``commit_interval``) is not committed:
   its transaction stays open across the rebalance (aiokafka then warns "Invalid state
   transition IN_TRANSACTION -> IN_TRANSACTION"), or is aborted when the partition moves to
   another worker, while the local RocksDB keeps the history written in it. Seen with a long
   commit interval (tests/test_reliability.py): when the partition came back, the worker trusted
   that history and skipped 10 messages whose replies had been aborted; in another run one
   message was answered twice, as the rebalance test had seen now and then. The fix forgets
   the revoked partitions' acknowledgements after the app's handler has committed them.
   Probably what faust-streaming/faust#502 ("messages were processed twice after
   rebalancing") reports; not fixed upstream.

7. What an event sends commits with that event. Faust chooses a record's transaction by the
   partition the record goes to. That is the event's own transaction only when the record goes
   to the event's partition number of a co-partitioned topic. A reply keyed by murmur2 to a
   message that a CRC32 producer (librdkafka: confluent-kafka, Quix Streams) had put on another
   partition landed in that other partition's transaction, which Faust commits only when that
   partition's offset moves; but the worker's own ``read_committed`` consumer waits on that
   partition behind the uncommitted reply, so nothing moves, the transaction times out and the
   worker crashes with ``ProducerFenced`` (seen: 4 replies, none ever visible, a crash 60 s
   later). A record for a topic the consumer has no metadata for (a separate reply topic, the
   dead-letter topic) went out with no transaction at all: faust-streaming/faust#177. As Kafka
   Streams sends everything a task produces through the task's producer, :class:`Transport`'s
   transaction manager sends what an event produces in the transaction of the event's
   partition, wherever it is written. Installed through Faust's transport, not ``apply()``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Protocol, runtime_checkable

from faust.streams import current_event
from faust.transport.consumer import (
    CONSUMER_PARTITIONS_REVOKED,
    Consumer,
    TopicPartitionGroup,
    TransactionManager,
)
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport
from faust.types import TP, HeadersArg, RecordMetadata

_original_highwaters = AIOKafkaConsumerThread._highwaters
_original_on_rebalance = TransactionManager.on_rebalance
_original_seek_to_committed = AIOKafkaConsumerThread.seek_to_committed
_original_commit = Consumer.commit
_original_perform_seek = Consumer.perform_seek
_original_commit_and_end_transactions = Consumer.commit_and_end_transactions

# Fix 4: one lock per process (one consumer, one event loop) and the final commit's flag.
_commit_barrier = asyncio.Lock()
_final_commit_begun = asyncio.Event()
_final_commit_done = asyncio.Event()


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


class EventTransactionManager(TransactionManager):
    """Fix 7: a record sent while an event is processed joins that event's transaction."""

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: HeadersArg | None,
        *,
        transactional_id: str | None = None,
    ) -> Awaitable[RecordMetadata]:
        event = current_event()
        if event is None:  # a changelog write from Faust's buffer: it names its partition
            return await super().send(topic, key, value, partition, timestamp, headers)
        [transactional_id] = _transactional_ids(self, [event.message.tp])
        if partition is None:  # None for a topic the consumer has no metadata for
            partition = self.consumer.key_partition(topic, key, None)
        return await self.producer.send(
            topic, key, value, partition, timestamp, headers, transactional_id=transactional_id
        )


class Transport(AIOKafkaTransport):
    """Faust's aiokafka transport with fix 7's transaction manager (``MarvinApp`` uses it)."""

    TransactionManager = EventTransactionManager


async def _on_rebalance_stopping_revoked_producers(
    self: TransactionManager, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP]
) -> None:
    still_active = self._tps_to_transactional_ids(assigned)
    gone = sorted(_transactional_ids(self, revoked) - still_active)
    if gone:
        self.log.info("Stopping transactional producers of revoked partitions: %s", gone)
        await self._stop_transactions(gone)
    await _original_on_rebalance(self, assigned, revoked, newly_assigned)


async def _seek_to_committed_or_to_the_start(self: AIOKafkaConsumerThread) -> Mapping[TP, int]:
    committed = await _original_seek_to_committed(self)
    if self.app.conf.consumer_auto_offset_reset != "earliest":
        return committed
    # Streams only: changelog positions belong to the recovery, and Faust's internal topics
    # (the assignor's leader topic) are not acked.
    topics = self.app.topics
    never_committed = sorted(
        tp
        for tp, offset in committed.items()
        if offset is None and topics.acks_enabled_for(tp.topic)
    )
    if never_committed:
        self.log.info("Seeking to the start of partitions never committed: %s", never_committed)
        await self.seek_to_beginning(*never_committed)
    return committed


@runtime_checkable
class AwaitableWrites(Protocol):
    """A table whose buffered changelog writes can be awaited (``tables.HistoryTable``)."""

    async def wait_written(self) -> None: ...


@asynccontextmanager
async def writes_of_one_event() -> AsyncIterator[None]:
    """Write one event's records (table changes, sends) with no commit in between.

    Once the worker's final commit has begun this never enters: it waits until the stop
    cancels the agent, and the event is left to the next owner of its partition.
    """
    async with _commit_barrier:
        if not _final_commit_begun.is_set():
            yield
            return
    await asyncio.Event().wait()  # outside the lock, so the final commit can go on


async def _commit_between_events(
    self: Consumer, topics: Any = None, start_new_transaction: bool = True
) -> bool:
    async with _commit_barrier:
        if _final_commit_done.is_set():
            # The stop's transactions are over: Faust's commit timer would fail with "Not in
            # the middle of a transaction". What is left uncommitted is read again next time.
            return False
        # A delivery failure raises here and crashes the consumer, as Faust's own send
        # failures at commit do: the transaction cannot commit, the next worker redoes it.
        for table in self.app.tables.values():
            if isinstance(table, AwaitableWrites):
                await table.wait_written()
        return await _original_commit(self, topics, start_new_transaction=start_new_transaction)


async def _flag_and_commit_and_end_transactions(self: Consumer) -> None:
    # Faust also ends its transactions before every rebalance; only the stop's is final.
    final = bool(self.app.should_stop)
    if final:
        _final_commit_begun.set()
    await _original_commit_and_end_transactions(self)
    if final:
        _final_commit_done.set()


async def _perform_seek_with_the_flow_stopped(self: Consumer) -> None:
    was_flowing = self.flow_active
    self.stop_flow()  # Faust's getmany abandons a batch it is handing out when the flow stops
    try:
        await _original_perform_seek(self)
    finally:
        if was_flowing:
            self.resume_flow()


@Consumer.transitions_to(CONSUMER_PARTITIONS_REVOKED)  # as Faust's own, for its diagnostics
async def _on_partitions_revoked_after_their_commit(self: Consumer, revoked: set[TP]) -> None:
    # Faust's own version clears this bookkeeping first; the app's handler (stop the flow, wait
    # for the agents, commit what they acked, end the transactions) needs the acks.
    if self._active_partitions is not None:
        self._active_partitions.difference_update(revoked)
    self._paused_partitions.difference_update(revoked)
    await self._on_partitions_revoked(revoked)
    for per_partition in (
        self._gap,
        self._acked,
        self._acked_index,
        self._read_offset,
        self._committed_offset,
    ):
        for tp in revoked:
            per_partition.pop(tp, None)


def apply() -> None:
    """Install the fixes (idempotent)."""
    AIOKafkaConsumerThread._highwaters = _highwaters_from_the_broker  # type: ignore[method-assign]
    TransactionManager.on_rebalance = _on_rebalance_stopping_revoked_producers  # type: ignore[method-assign]
    AIOKafkaConsumerThread.seek_to_committed = _seek_to_committed_or_to_the_start  # type: ignore[method-assign]
    Consumer.commit = _commit_between_events  # type: ignore[method-assign]
    Consumer.commit_and_end_transactions = _flag_and_commit_and_end_transactions  # type: ignore[method-assign]
    Consumer.perform_seek = _perform_seek_with_the_flow_stopped  # type: ignore[method-assign]
    Consumer.on_partitions_revoked = _on_partitions_revoked_after_their_commit  # type: ignore[method-assign]
