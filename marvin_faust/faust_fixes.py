"""Eleven fixes to faust-streaming, as subclasses of its aiokafka transport and table manager.

``MarvinApp`` runs on :class:`Transport`, whose consumer, consumer thread and transaction
manager carry the fixes, and on :class:`TableManager`, whose table recovery does; nothing in
Faust is replaced process-wide, so another Faust app in the same process (the bench's baseline)
runs on Faust as released. The fixes were verified on
faust-streaming :data:`VERIFIED_FAUST_VERSION` only: :func:`check_faust_version` stops a start
on any other. ``MARVIN_DISABLED_FAUST_FIXES`` turns fixes off by number, for the tests that show
a fix's bug without it. None is fixed upstream.

1. Recovery highwaters. Under exactly_once the table recovery takes a changelog partition's
   highwater from aiokafka's ``last_stable_offset``, unknown (-1) until that partition was
   fetched: right after a rebalance a worker crashed with ``ConsistencyError: The persisted
   offset ... is higher than the last offset in that topic (highwater)`` or skipped the recovery.
   Asks the broker instead (robinhood/faust#658).
2. Transactional producers of revoked partitions. Faust stops only the ones its assignor does
   not call standby, and it calls the chat partitions behind a standby changelog standby too;
   the kept producer is fenced by the next owner and crashes the worker when the partition
   comes back (``ProducerFenced``). Stops every revoked partition's producer not still active.
3. Partitions with no committed offset. After a rebalance or recovery Faust seeks back to the
   committed offsets; aiokafka leaves a partition without one where its fetcher got to, and the
   messages waiting there were skipped. Sends those to where ``consumer_auto_offset_reset``
   says a new group starts.
4. One event's records in one transaction. Faust commits on a timer between any two awaits and
   waits for nothing: a history write and its reply could land in two transactions, and a stop
   could write after its final commit. A commit takes the app's
   :class:`~marvin_faust.transactions.CommitBarrier` (the agent writes one event under it) and
   first waits for every table write made so far; after the stop's final commit nothing more
   commits (it crashed with "Not in the middle of a transaction").
5. No stale records after a seek. A batch fetched before the post-recovery seek could still be
   handed out after it and make Faust drop the message at the committed offset as already
   read. The consumer's flow is stopped for the seek.
6. Acknowledgements kept for the rebalance's commit. On a revocation Faust forgot what was
   acknowledged since the last commit before committing it: those answers stayed in open or
   aborted transactions while RocksDB kept their history (messages lost or answered twice).
   Forgets them after the commit (probably faust-streaming/faust#502).
7. What an event sends commits with that event. Faust picks a record's transaction by the
   partition it is written to. A reply keyed by murmur2 to a message a CRC32 producer
   (librdkafka) had put elsewhere sat in another partition's transaction, committed only when
   that partition's offset moved, while the worker's ``read_committed`` consumer waited behind
   it there: a stall, then ``ProducerFenced``. A record for a topic the consumer has no
   metadata for went out with no transaction at all (faust-streaming/faust#177). Sends what an
   event produces in the transaction of the event's partition, as Kafka Streams' task producer
   does.
8. No commit past an unfinished event. Faust commits the run of acknowledged offsets that
   follows the committed one, and lets one missing offset pass at its head (a transaction
   marker takes an offset and is never delivered). With several events in flight that missing
   offset can be an event still being answered: its offset was committed before it was done (a
   crash then lost it), and its reply sat in a transaction no later commit ended (seen: a reply
   invisible for minutes, 2 runs in 3 with 4 generations in flight). Commits stop below the
   lowest delivered offset not yet acknowledged, kept in a record of its own: Faust's is a
   WeakSet, and an event a stop cancelled dropped out of it (seen: 1 message of 29 lost when
   a refused dead letter stopped the worker). Under exactly_once the transaction of a
   partition held so still commits, at the held offset: answers acknowledged behind a long
   generation were invisible until it ended.
9. A recovery ends where its changelog does. The recovery waits until it has applied the
   changelog partition's last offset, but under exactly_once that offset is a transaction
   marker, never delivered: Faust took such a partition as recovered only after two idle 5 s
   cycles ("Aborted tx until highwater"), and under at_least_once never. The consumer thread
   notes, after each fetch, up to where a changelog partition holds no record it has not
   handed out; the recovery takes a partition as recovered once it has applied every record
   handed out and the consumer's position is past the highwater.
10. Changelog offsets recorded at commit. Under exactly_once Faust records how far its own
   changelog writes got (RocksDB's persisted offset) only when they commit, but files them under
   the changelog partition and looks them up under the committed source partition: it never
   records them (robinhood/faust#599), and every recovery read again what the worker itself had
   written. A commit of a transaction records the offsets of the changelog writes delivered in
   it.
11. Short fetch long polls. Faust's consumer asks the broker to hold a fetch up to 1.5 s while
   nothing new is there (aiokafka's default: 0.5 s), and the broker answers one request of a
   connection at a time: each offset lookup of a recovery (highwaters, earliest offsets, the
   seek of partitions never committed) and the first fetch of a partition just resumed waited
   behind such a fetch, about 1.4 s each, 4.5 s of every start. Fetches wait at most
   :data:`FETCH_MAX_WAIT_MS`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable
from weakref import WeakSet

import faust
from faust.streams import current_event
from faust.tables.manager import TableManager as BaseTableManager
from faust.tables.recovery import Recovery as BaseRecovery
from faust.transport.consumer import (
    CONSUMER_PARTITIONS_REVOKED,
    TopicPartitionGroup,
)
from faust.transport.consumer import Consumer as BaseConsumer
from faust.transport.consumer import TransactionManager as BaseTransactionManager
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, HeadersArg, RecordMetadata

VERIFIED_FAUST_VERSION = "0.15.3"
FIXES = frozenset(range(1, 12))

# Fix 11: how long the broker may hold a fetch that finds nothing new. A lookup or a resumed
# partition waits at most this long; an idle worker sends 1/FETCH_MAX_WAIT fetches a second.
FETCH_MAX_WAIT_MS = 100


class FaustVersionError(Exception):
    """The installed faust-streaming is not the one the fixes were verified on."""


def check_faust_version(installed: str = faust.__version__) -> None:
    if installed != VERIFIED_FAUST_VERSION:
        raise FaustVersionError(
            f"marvin-faust's Faust fixes were verified on faust-streaming "
            f"{VERIFIED_FAUST_VERSION}, but {installed} is installed: install "
            f"faust-streaming=={VERIFIED_FAUST_VERSION}"
        )


@runtime_checkable
class AwaitableWrites(Protocol):
    """A table whose buffered changelog writes can be awaited (``tables.HistoryTable``)."""

    async def wait_written(self) -> None: ...


def _fixes(service: Any, number: int) -> bool:
    """Whether fix ``number`` is on for the transport ``service`` belongs to."""
    return number not in getattr(service.transport, "disabled", frozenset())


# -- The consumer thread -----------------------------------------------------------------------


class ShortLongPolls:
    """Fix 11: a fetch finding nothing new is held by the broker :data:`FETCH_MAX_WAIT_MS`,
    not Faust's 1.5 s, so the offset lookups behind it on the same connection do not wait."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        if _fixes(self.consumer, 11):
            # Faust passes fetch_max_wait_ms=1500 itself; aiokafka reads it at start.
            consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class HighwatersFromTheBroker:
    """Fix 1 (robinhood/faust#658): recovery highwaters asked of the broker."""

    async def _highwaters(self, partitions: Iterable[TP]) -> Mapping[TP, int]:
        if not (_fixes(self.consumer, 1) and self.consumer.in_transaction):
            return await super()._highwaters(partitions)
        # ListOffsets from a read_committed consumer: the last stable offset, fetched or not.
        consumer: Any = self._ensure_consumer()
        return await consumer.end_offsets(list(partitions))


class NeverCommittedFromTheStart:
    """Fix 3: partitions with no committed offset are read from the start after a seek."""

    async def seek_to_committed(self) -> Mapping[TP, int]:
        committed = await super().seek_to_committed()
        if not _fixes(self.consumer, 3) or self.app.conf.consumer_auto_offset_reset != "earliest":
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


class ChangelogRead(NamedTuple):
    """What a consumer read of a changelog partition: no record it did not hand out lies
    between ``last`` and ``position`` (both excluded)."""

    last: int
    position: int


def changelog_read(
    before: ChangelogRead | None, handed_out: list[Any], position: int | None
) -> ChangelogRead | None:
    """A changelog partition's read after a fetch that handed out ``handed_out`` (its records, in
    offset order) and left the consumer at ``position``; ``before``: its read before that fetch,
    since the last seek.

    A fetch hands out a partition's records in order and moves the position past what it
    skipped (transaction markers, aborted records), so nothing unread lies between its last
    record and the position. Without records that holds from the read before it, if any.
    """
    if position is None:
        return None
    if handed_out:
        return ChangelogRead(handed_out[-1].offset, position)
    if before is None:
        return None
    return ChangelogRead(before.last, position)


def _positions(consumer: Any, tps: Iterable[TP]) -> dict[TP, int]:
    """aiokafka's current positions of ``tps`` (those it has one for), without waiting."""
    subscription = consumer._subscription.subscription
    assignment = subscription.assignment if subscription is not None else None
    positions = {}
    for tp in tps:
        state = assignment.state_value(tp) if assignment is not None else None
        if state is not None and state.has_valid_position:
            positions[tp] = state.position
    return positions


class NotesChangelogReads:
    """Fix 9, the consumer thread's half: after each fetch, how far each changelog partition
    was read (:class:`ChangelogRead`), for the recovery."""

    changelog_reads: dict[TP, ChangelogRead]

    async def _fetch_records(
        self,
        consumer: Any,
        active_partitions: set[TP],
        timeout: float | None = None,
        max_records: int | None = None,
    ) -> Mapping[TP, list[Any]]:
        records = await super()._fetch_records(
            consumer, active_partitions, timeout=timeout, max_records=max_records
        )
        if not _fixes(self.consumer, 9) or not active_partitions:
            return records
        # No await from the fetch to here: the positions are the ones the fetch left.
        changelogs = [tp for tp in active_partitions if self.consumer._is_changelog_tp(tp)]
        positions = _positions(consumer, changelogs)
        reads = self.changelog_reads
        moved_without_records = False
        for tp in changelogs:
            before = reads.get(tp)
            read = changelog_read(before, records.get(tp, []), positions.get(tp))
            if read is None:
                reads.pop(tp, None)
                continue
            reads[tp] = read  # one assignment: the recovery reads it from the app's thread
            if tp not in records and before is not None and read.position != before.position:
                moved_without_records = True
        if moved_without_records and not self.parent_loop.is_closed():
            # Only markers past the last record: no event will tell the recovery.
            self.parent_loop.call_soon_threadsafe(self._changelog_moved)
        return records

    def __post_init__(self) -> None:
        super().__post_init__()
        # Written by this thread, read by the app's: each value is replaced, never changed.
        self.changelog_reads: dict[TP, ChangelogRead] = {}

    async def _seek_wait(self, consumer: Any, partitions: Mapping[TP, int]) -> None:
        # A read holds from one seek to the next: the recovery's seeks start each one afresh.
        for tp, offset in partitions.items():
            self.changelog_reads[tp] = ChangelogRead(offset - 1, offset)
        await super()._seek_wait(consumer, partitions)

    def seek(self, partition: TP, offset: int) -> None:
        self.changelog_reads.pop(partition, None)
        super().seek(partition, offset)

    async def seek_to_beginning(self, *partitions: Any) -> None:
        for tp in partitions:
            self.changelog_reads.pop(tp, None)
        await super().seek_to_beginning(*partitions)

    def _changelog_moved(self) -> None:
        recovery = self.app.tables.recovery
        if isinstance(recovery, EndsWhereTheChangelogEnds):
            recovery.on_changelog_moved()


class ConsumerThread(
    ShortLongPolls,
    HighwatersFromTheBroker,
    NeverCommittedFromTheStart,
    NotesChangelogReads,
    faust_aiokafka.AIOKafkaConsumerThread,
):
    pass


# -- The consumer ------------------------------------------------------------------------------


class CommitsBetweenEvents:
    """Fix 4: a commit never falls between one event's records, nor after a stop's last one."""

    async def commit(self, topics: Any = None, start_new_transaction: bool = True) -> bool:
        barrier = getattr(self.app, "commit_barrier", None)
        if barrier is None or not _fixes(self, 4):
            return await super().commit(topics, start_new_transaction=start_new_transaction)
        async with barrier.between_events() as may_commit:
            if not may_commit:
                # The stop's transactions are over: Faust's commit timer would fail with "Not
                # in the middle of a transaction". What is left uncommitted is read again.
                return False
            # A delivery failure raises here and crashes the consumer, as Faust's own send
            # failures at commit do: the transaction cannot commit, the next worker redoes it.
            for table in self.app.tables.values():
                if isinstance(table, AwaitableWrites):
                    await table.wait_written()
            return await super().commit(topics, start_new_transaction=start_new_transaction)

    async def commit_and_end_transactions(self) -> None:
        barrier = getattr(self.app, "commit_barrier", None)
        # Faust also ends its transactions before every rebalance; only the stop's is final.
        final = barrier is not None and _fixes(self, 4) and bool(self.app.should_stop)
        if final:
            barrier.final_commit_begins()
        await super().commit_and_end_transactions()
        if final:
            barrier.final_commit_ended()


class SeeksWithTheFlowStopped:
    """Fix 5: no record fetched before the post-recovery seek is handed out after it."""

    async def perform_seek(self) -> None:
        if not _fixes(self, 5):
            return await super().perform_seek()
        was_flowing = self.flow_active
        self.stop_flow()  # Faust's getmany abandons a batch it is handing out when the flow stops
        try:
            await super().perform_seek()
        finally:
            if was_flowing:
                self.resume_flow()


class RevocationsCommitTheirAcks:
    """Fix 6 (probably faust-streaming/faust#502): a revocation commits what was acked."""

    @BaseConsumer.transitions_to(CONSUMER_PARTITIONS_REVOKED)  # as Faust's own, for diagnostics
    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        if not _fixes(self, 6):
            return await super().on_partitions_revoked(revoked)
        # Faust's own version clears this bookkeeping first; the app's handler (stop the flow,
        # wait for the agents, commit what they acked, end the transactions) needs the acks.
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


class HeldMessages(WeakSet):
    """Fix 8: Faust's set of the messages handed to agents and not acknowledged, holding each
    until it is acknowledged or its partition revoked.

    Faust keeps them in a plain WeakSet: an event a stop cancelled was garbage at once and
    dropped out, and the stop's commit passed it. Faust's stream (its Cython iterator too)
    adds to this set; acknowledged messages are let go at the next commit.
    """

    def __init__(self) -> None:
        super().__init__()
        self._held: dict[TP, list[Any]] = {}
        # Under exactly_once: the newest acknowledgement committed behind an unfinished event.
        self.committed_behind: dict[TP, int] = {}

    def add(self, message: Any) -> None:
        super().add(message)
        self._held.setdefault(message.tp, []).append(message)

    def first_unfinished(self, tp: TP, committed: int | None) -> int | None:
        """The lowest offset at or past ``committed`` handed out and not acknowledged."""
        held = self._held.get(tp)
        if not held:
            return None
        held[:] = [message for message in held if not message.acked]
        offsets = (m.offset for m in held if committed is None or m.offset >= committed)
        return min(offsets, default=None)

    def forget(self, tps: Iterable[TP]) -> None:
        """Let go of the messages of ``tps``: Faust's own weak record keeps them as before."""
        for tp in tps:
            self._held.pop(tp, None)
            self.committed_behind.pop(tp, None)


class CommitsBelowUnfinishedEvents:
    """Fix 8: a commit never passes an event that was delivered and not acknowledged; under
    exactly_once, the answers acknowledged behind such an event still commit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if _fixes(self, 8):
            self._unacked_messages = HeldMessages()

    @property
    def _held(self) -> HeldMessages | None:
        held = self._unacked_messages
        return held if isinstance(held, HeldMessages) else None

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        await super().on_partitions_revoked(revoked)  # commits below the unfinished events
        if self._held is not None:
            self._held.forget(revoked)

    def _new_offset(self, tp: TP) -> int | None:
        if self._held is None:
            return super()._new_offset(tp)
        first = self._held.first_unfinished(tp, self._committed_offset[tp])
        if first is None:
            return super()._new_offset(tp)
        # Faust's own computation over the acknowledgements below the first unfinished
        # event; those above it wait for the next commit.
        acked = self._acked[tp]
        later = [offset for offset in acked if offset > first]
        acked[:] = [offset for offset in acked if offset < first]
        try:
            return super()._new_offset(tp)
        finally:
            acked.extend(later)
            acked.sort()

    def _filter_committable_offsets(self, tps: Iterable[TP]) -> dict[TP, int]:
        tps = list(tps)
        offsets = super()._filter_committable_offsets(tps)
        if self._held is None or not self.in_transaction:
            return offsets
        # An answer's reply and history are in its partition's transaction, which Faust
        # commits only with a new offset: behind a long generation they stayed invisible
        # until it ended (a [hang], the model timeout). Commit them at the offset held, once
        # per new acknowledgement.
        for tp in tps:
            newest = max(self._acked[tp], default=None)
            if tp in offsets or newest is None or self._held.committed_behind.get(tp) == newest:
                continue
            committed = self._committed_offset[tp]
            held = committed if committed is not None else self._held.first_unfinished(tp, None)
            if held is not None:
                offsets[tp] = held
                self._held.committed_behind[tp] = newest
        return offsets


class Consumer(
    CommitsBetweenEvents,
    CommitsBelowUnfinishedEvents,
    SeeksWithTheFlowStopped,
    RevocationsCommitTheirAcks,
    faust_aiokafka.Consumer,
):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


# -- The table recovery ------------------------------------------------------------------------


def read_to_the_end(applied: int | None, highwater: int | None, read: ChangelogRead | None) -> bool:
    """Whether a changelog partition is recovered: every record up to ``applied`` is in the
    table, and ``read`` shows nothing else before the position, which is past ``highwater``
    (Faust's highwater: the partition's last offset, a transaction marker under exactly_once).
    """
    return (
        applied is not None
        and highwater is not None
        and read is not None
        and applied >= read.last
        and read.position > highwater
    )


class EndSignal(asyncio.Event):
    """The recovery's end signal, which knows whether anyone waits for it: the recovery does
    from the moment it starts reading the changelogs."""

    waiting = 0

    async def wait(self) -> Literal[True]:
        self.waiting += 1
        try:
            return await super().wait()
        finally:
            self.waiting -= 1


class EndsWhereTheChangelogEnds:
    """Fix 9: a recovery does not wait for a transaction marker it will never be handed."""

    _signal_recovery_end: EndSignal | None

    def need_recovery(self) -> bool:
        if _fixes(self.app, 9):
            self._take_read_partitions_as_recovered()
        return super().need_recovery()

    def _take_read_partitions_as_recovered(self) -> None:
        reads: Mapping[TP, ChangelogRead] = getattr(
            self.app.consumer._thread, "changelog_reads", {}
        )
        offsets = self.active_offsets
        for tp, highwater in self.active_highwaters.items():
            applied = offsets.get(tp)
            if applied is None or highwater is None or applied >= highwater:
                continue
            if read_to_the_end(applied, highwater, reads.get(tp)):
                self.log.info(
                    "Changelog %s read to its end: nothing to apply after offset %s up to the "
                    "highwater %s (transaction markers)",
                    tp,
                    applied,
                    highwater,
                )
                # As Faust's own "Aborted tx until highwater", without its two idle cycles.
                offsets[tp] = highwater

    @property
    def signal_recovery_end(self) -> EndSignal:
        if self._signal_recovery_end is None:
            self._signal_recovery_end = EndSignal()
        return self._signal_recovery_end

    def on_changelog_moved(self) -> None:
        """A fetch moved a changelog partition past markers without handing out a record: no
        event will make the recovery look again, Faust's own end of a recovery only runs after
        an idle 5 s. Ends the recovery as Faust's own end does, if the recovery is reading: a
        rebalance can come between the fetch and this call, and a recovery that starts reading
        after an end signalled early would not read at all."""
        if self.signal_recovery_end.waiting and self.in_recovery and not self.need_recovery():
            self.flush_buffers()
            self._set_recovery_ended()
            self.signal_recovery_end.set()


class Recovery(EndsWhereTheChangelogEnds, BaseRecovery):
    pass


class TableManager(BaseTableManager):
    """Faust's table manager, on the fixed :class:`Recovery`."""

    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = Recovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery


# -- The transaction manager -------------------------------------------------------------------


def _transactional_id(manager: Any, tp: TP) -> str:
    """The transactional id of ``tp``, standby or not (Faust's own helper leaves standbys out)."""
    group = manager.app.assignor.group_for_topic(tp.topic)
    return manager.transactional_id_format.format(
        tpg=TopicPartitionGroup(tp.topic, tp.partition, group), group_id=manager.app.conf.id
    )


def _transactional_ids(manager: Any, tps: Iterable[TP]) -> set[str]:
    return {_transactional_id(manager, tp) for tp in tps}


class StopsRevokedProducers:
    """Fix 2: every revoked partition's transactional producer stops, standby or not."""

    async def on_rebalance(
        self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP]
    ) -> None:
        if _fixes(self, 2):
            still_active = self._tps_to_transactional_ids(assigned)
            gone = sorted(_transactional_ids(self, revoked) - still_active)
            if gone:
                self.log.info("Stopping transactional producers of revoked partitions: %s", gone)
                await self._stop_transactions(gone)
        await super().on_rebalance(assigned, revoked, newly_assigned)


class SendsInTheEventsTransaction:
    """Fix 7 (faust-streaming/faust#177): what an event sends joins that event's transaction."""

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
        # No event: a changelog write from Faust's buffer, which names its partition.
        if event is None or not _fixes(self, 7):
            return await super().send(topic, key, value, partition, timestamp, headers)
        [transactional_id] = _transactional_ids(self, [event.message.tp])
        if partition is None:  # None for a topic the consumer has no metadata for
            partition = self.consumer.key_partition(topic, key, None)
        return await self.producer.send(
            topic, key, value, partition, timestamp, headers, transactional_id=transactional_id
        )


class RecordsCommittedChangelogOffsets:
    """Fix 10 (robinhood/faust#599): a commit records how far the changelog writes it commits
    got, as RocksDB's persisted offset, so that the next recovery starts after them."""

    async def commit(self, offsets: Mapping[TP, int], start_new_transaction: bool = True) -> bool:
        if not _fixes(self, 10):
            return await super().commit(offsets, start_new_transaction=start_new_transaction)
        # Faust files each delivered changelog write here (under exactly_once only) until its
        # transaction commits. What is delivered now is in the transactions this commit ends;
        # a transaction without its producer commits nothing ("Commit invoked for unknown
        # transaction").
        pending = self.app.tables._pending_persisted_offsets
        committing = _transactional_ids(self, offsets) & set(self.producer._transaction_producers)
        written = {
            tp: entry
            for tp, entry in list(pending.items())
            if _transactional_id(self, tp) in committing
        }
        committed = await super().commit(offsets, start_new_transaction=start_new_transaction)
        if not committed or self.app.crashed:  # a fenced producer crashes the app, no raise
            return committed
        for tp, entry in written.items():
            store, offset = entry
            persisted = store.persisted_offset(tp)
            if persisted is None or offset > persisted:
                store.set_persisted_offset(tp, offset)
            if pending.get(tp) == entry:
                del pending[tp]
        return committed

    async def on_rebalance(
        self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP]
    ) -> None:
        if _fixes(self, 10):
            # A revoked partition's producer stops (fix 2) and its open transaction never
            # commits: its writes are not to be recorded.
            gone = _transactional_ids(self, revoked) - self._tps_to_transactional_ids(assigned)
            pending = self.app.tables._pending_persisted_offsets
            for tp in [tp for tp in pending if _transactional_id(self, tp) in gone]:
                del pending[tp]
        await super().on_rebalance(assigned, revoked, newly_assigned)


class TransactionManager(
    RecordsCommittedChangelogOffsets,
    StopsRevokedProducers,
    SendsInTheEventsTransaction,
    BaseTransactionManager,
):
    pass


class Transport(faust_aiokafka.Transport):
    """Faust's aiokafka transport with every fix not listed in ``disabled``."""

    Consumer = Consumer
    TransactionManager = TransactionManager

    def __init__(self, *args: Any, disabled: Iterable[int] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.disabled = frozenset(disabled)
