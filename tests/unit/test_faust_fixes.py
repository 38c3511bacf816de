"""The Faust fixes in marvin_faust.faust_fixes that can be shown without a broker: each fix is
a mixin, put here on top of a stand-in for the Faust class it fixes.

Their effect on real workers is shown by tests/e2e/test_reliability.py and
tests/e2e/test_client_families.py.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from faust.streams import _current_event
from faust.tables.manager import TableManager as BaseTableManager
from faust.tables.recovery import Recovery as BaseRecovery
from faust.transport.consumer import Consumer as BaseConsumer
from faust.types import TP
from intervaltree import IntervalTree

from marvin_faust import faust_fixes
from marvin_faust.transactions import CommitBarrier

ALL_FIXES_ON = SimpleNamespace(disabled=frozenset())


def fake_app(*, stopping: bool = False, tables: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        should_stop=stopping,
        in_transaction=False,
        tables=tables or {},
        commit_barrier=CommitBarrier(),
    )


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


class FaustCommits:
    """Faust's consumer as fix 4 sees it: ``commit`` recorded (its ``start_new_transaction``),
    and a final commit that commits through ``commit``, as Faust's does."""

    def __init__(self, app: SimpleNamespace, transport: SimpleNamespace = ALL_FIXES_ON) -> None:
        self.app, self.transport = app, transport
        self.commits: list[bool] = []

    async def commit(self, topics=None, start_new_transaction=True) -> bool:
        self.commits.append(start_new_transaction)
        return True

    async def commit_and_end_transactions(self) -> None:
        await self.commit(start_new_transaction=False)


class Committing(faust_fixes.CommitsBetweenEvents, FaustCommits):
    pass


async def test_a_commit_waits_until_the_event_has_written_everything():
    app = fake_app()
    consumer = Committing(app)
    async with app.commit_barrier.writes_of_one_event():
        commit = asyncio.ensure_future(consumer.commit())
        await settle()
        assert not consumer.commits, "a commit ran between the writes of one event"
    assert await commit is True
    assert consumer.commits == [True]


async def write_one_event(barrier: CommitBarrier, wrote: asyncio.Event) -> None:
    """An agent handling one event: it writes under the barrier."""
    async with barrier.writes_of_one_event():
        wrote.set()


class SlowTable:
    """A table whose buffered writes are delivered when the test says so."""

    def __init__(self) -> None:
        self.delivered = asyncio.get_running_loop().create_future()

    async def wait_written(self) -> None:
        await self.delivered


async def test_a_commit_first_waits_until_the_table_writes_are_delivered():
    table = SlowTable()
    app = fake_app(tables={"history": table, "plain": object()})
    consumer = Committing(app)
    commit = asyncio.ensure_future(consumer.commit())
    await settle()
    assert not consumer.commits, "committed before the table write was delivered"
    # Meanwhile no event writes: what the commit waits for is all it commits.
    wrote = asyncio.Event()
    handler = asyncio.ensure_future(write_one_event(app.commit_barrier, wrote))
    await settle()
    assert not wrote.is_set()
    table.delivered.set_result(None)
    assert await commit is True
    assert consumer.commits == [True]
    await handler
    assert wrote.is_set()


async def test_a_commit_whose_table_write_failed_raises_and_commits_nothing():
    table = SlowTable()
    table.delivered.set_exception(RuntimeError("ProducerFenced"))
    app = fake_app(tables={"history": table})
    consumer = Committing(app)
    with pytest.raises(RuntimeError, match="ProducerFenced"):
        await consumer.commit()
    assert not consumer.commits
    async with app.commit_barrier.writes_of_one_event():  # the barrier was let go
        pass


async def test_a_rebalance_ending_the_transactions_does_not_stop_the_writes():
    app = fake_app()
    await Committing(app).commit_and_end_transactions()
    wrote = False
    async with app.commit_barrier.writes_of_one_event():
        wrote = True
    assert wrote


async def test_nothing_is_written_after_the_final_commit_of_a_stop():
    app = fake_app(stopping=True)
    await Committing(app).commit_and_end_transactions()
    wrote = asyncio.Event()
    handler = asyncio.ensure_future(write_one_event(app.commit_barrier, wrote))
    await settle()
    assert not wrote.is_set() and not handler.done()
    # It waits outside the barrier: another commit (Faust's consumer stop) still goes through.
    assert await asyncio.wait_for(Committing(fake_app()).commit(), 1) is True
    async with asyncio.timeout(1), app.commit_barrier.between_events():
        pass
    handler.cancel()  # what the worker's stop does to the agent
    with pytest.raises(asyncio.CancelledError):
        await handler
    assert not wrote.is_set()


async def test_no_commit_follows_the_final_commit_of_a_stop():
    consumer = Committing(fake_app(stopping=True))
    await consumer.commit_and_end_transactions()
    assert consumer.commits == [False]  # the final commit itself went through
    assert await consumer.commit() is False  # the timer's next one
    assert consumer.commits == [False]


async def test_after_a_rebalance_commits_go_on():
    consumer = Committing(fake_app())
    await consumer.commit_and_end_transactions()
    assert await consumer.commit() is True
    assert consumer.commits == [False, True]


async def test_with_fix_4_off_a_commit_does_not_wait_for_the_event():
    app = fake_app()
    consumer = Committing(app, transport=SimpleNamespace(disabled=frozenset({4})))
    async with app.commit_barrier.writes_of_one_event():
        assert await asyncio.wait_for(consumer.commit(), 1) is True


class FaustSeeks:
    """The flow switches of Faust's consumer, and what its seek saw of them."""

    def __init__(self, flowing: bool) -> None:
        self.transport = ALL_FIXES_ON
        self.flow_active = flowing
        self.flow_during_seek: list[bool] = []

    def stop_flow(self) -> None:
        self.flow_active = False

    def resume_flow(self) -> None:
        self.flow_active = True

    async def perform_seek(self) -> None:
        self.flow_during_seek.append(self.flow_active)


class Seeking(faust_fixes.SeeksWithTheFlowStopped, FaustSeeks):
    pass


async def test_the_seek_runs_with_the_flow_stopped_and_restores_it():
    flowing, stopped = Seeking(True), Seeking(False)
    await flowing.perform_seek()
    await stopped.perform_seek()
    assert flowing.flow_during_seek == [False] and flowing.flow_active
    assert stopped.flow_during_seek == [False] and not stopped.flow_active


async def test_the_history_table_waits_for_its_changelog_writes(unit_app, monkeypatch):
    from faust.tables.base import Collection

    history = unit_app.history
    futures: list[asyncio.Future] = []

    def send_changelog(self, *args, **kwargs):
        futures.append(asyncio.get_running_loop().create_future())
        return futures[-1]

    monkeypatch.setattr(Collection, "send_changelog", send_changelog)
    monkeypatch.setattr(history, "_unwritten", [])  # not what other tests' agents wrote
    history.send_changelog(0, b"c1", [])
    history.send_changelog(0, b"c2", [])
    waiting = asyncio.ensure_future(history.wait_written())
    await settle()
    assert not waiting.done()
    futures[0].set_result(None)
    await settle()
    assert not waiting.done(), "returned before the second write was delivered"
    futures[1].set_result(None)
    await waiting


class FaustRevokes:
    """Faust's per-partition consumer bookkeeping, with an app handler recording the acks it
    would commit."""

    def __init__(self, tp) -> None:
        self.transport = ALL_FIXES_ON
        self.diag = SimpleNamespace(set_flag=lambda flag: None, unset_flag=lambda flag: None)
        self._active_partitions = {tp}
        self._paused_partitions = {tp}
        self._gap: dict = {}
        self._acked = {tp: [7, 8]}
        self._acked_index = {tp: {7, 8}}
        self._read_offset = {tp: 8}
        self._committed_offset = {tp: 7}
        self.acked_at_commit: dict = {}

    async def _on_partitions_revoked(self, revoked) -> None:
        self.acked_at_commit = {tp: list(self._acked.get(tp, [])) for tp in revoked}


class Revoking(faust_fixes.RevocationsCommitTheirAcks, FaustRevokes):
    pass


async def test_a_revocation_commits_the_acks_before_forgetting_them():
    revoked, kept = TP("chat", 0), TP("chat", 1)
    consumer = Revoking(revoked)
    consumer._acked[kept] = [3]
    await consumer.on_partitions_revoked({revoked})
    assert consumer.acked_at_commit == {revoked: [7, 8]}
    assert revoked not in consumer._active_partitions | consumer._paused_partitions
    for per_partition in (consumer._acked, consumer._acked_index, consumer._read_offset):
        assert revoked not in per_partition
    assert consumer._committed_offset == {}
    assert consumer._acked == {kept: [3]}  # other partitions' acks are left for their commit


class Event:
    """What ``faust.current_event()`` returns while an agent handles a record."""

    def __init__(self, tp) -> None:
        self.message = SimpleNamespace(tp=tp)


class FaustSends:
    """Faust's transaction manager as fix 7 sees it: ``send`` by destination, recorded."""

    transactional_id_format = "{group_id}-{tpg.group}-{tpg.partition}"

    async def send(
        self, topic, key, value, partition, timestamp, headers, *, transactional_id=None
    ):
        self.producer.sent.append((topic, partition, f"marvin-0-{partition}"))
        return asyncio.get_running_loop().create_future()


class Sending(faust_fixes.SendsInTheEventsTransaction, FaustSends):
    pass


class RecordingProducer:
    def __init__(self) -> None:
        self.sent: list[tuple] = []

    async def send(self, topic, key, value, partition, timestamp, headers, *, transactional_id):
        self.sent.append((topic, partition, transactional_id))
        return asyncio.get_running_loop().create_future()


def transaction_manager(consumer_partitions: dict[str, int]):
    """A transaction manager with fix 7 on app "marvin" whose topics are all in assignor group 0;
    the consumer knows ``consumer_partitions`` (topic -> the partition a key hashes to)."""
    manager = Sending()
    manager.transport = ALL_FIXES_ON
    manager.app = SimpleNamespace(
        conf=SimpleNamespace(id="marvin"),
        assignor=SimpleNamespace(group_for_topic=lambda topic: 0),
    )
    manager.consumer = SimpleNamespace(
        key_partition=lambda topic, key, partition: (
            partition if partition is not None else consumer_partitions.get(topic)
        )
    )
    manager.producer = RecordingProducer()
    return manager


async def test_what_an_event_sends_joins_the_transaction_of_the_events_partition():
    manager = transaction_manager({"chat": 3})
    event = Event(TP("chat", 1))  # a librdkafka producer put the message on partition 1
    token = _current_event.set(weakref.ref(event))
    try:
        await manager.send("chat", b"c1", b"reply", None, None, None)  # murmur2 says 3
        await manager.send("chat", b"c1", b"reply", 1, None, None)
        await manager.send("chat-dead-letters", b"c1", b"bad", None, None, None)  # no metadata
    finally:
        _current_event.reset(token)
    assert manager.producer.sent == [
        ("chat", 3, "marvin-0-1"),
        ("chat", 1, "marvin-0-1"),
        ("chat-dead-letters", None, "marvin-0-1"),
    ]


async def test_a_send_outside_an_event_keeps_the_transaction_of_its_partition():
    manager = transaction_manager({"history-changelog": 2})
    # Faust's buffered changelog writes name their partition and have no current event.
    await manager.send("history-changelog", b"c1", b"[]", 2, None, None)
    assert manager.producer.sent == [("history-changelog", 2, "marvin-0-2")]


PARTITION = TP("chat", 0)


@dataclass(eq=False)
class Delivered:
    """A message as Faust's consumer tracks it until it is acknowledged."""

    tp: TP
    offset: int
    acked: bool = False


class Acknowledgements:
    """Faust's consumer as fix 8 sees it: its own offset computation over real bookkeeping,
    its WeakSet of unacknowledged messages, and a stream that adds to ``unacked``."""

    _new_offset = BaseConsumer._new_offset
    _should_commit = BaseConsumer._should_commit
    _filter_committable_offsets = BaseConsumer._filter_committable_offsets

    def __init__(
        self,
        committed: int | None,
        transport: SimpleNamespace = ALL_FIXES_ON,
        in_transaction: bool = False,
    ) -> None:
        self.transport = transport
        self.in_transaction = in_transaction
        self._committed_offset = defaultdict(lambda: committed)
        self._acked: defaultdict[TP, list[int]] = defaultdict(list)
        self._acked_index: defaultdict[TP, set[int]] = defaultdict(set)
        self._gap: defaultdict[TP, IntervalTree] = defaultdict(IntervalTree)
        self._unacked_messages: weakref.WeakSet = weakref.WeakSet()
        self.revoked: list[set[TP]] = []

    @property
    def unacked(self) -> weakref.WeakSet:
        return self._unacked_messages

    def deliver(self, offset: int) -> Delivered:
        """Hand a message to the agent, as Faust's stream does."""
        message = Delivered(PARTITION, offset)
        self.unacked.add(message)
        return message

    def commit(self) -> int | None:
        """The offset a commit now would commit, remembered as committed (as Faust does)."""
        offset = self._filter_committable_offsets([PARTITION]).get(PARTITION)
        if offset is not None:
            self._committed_offset[PARTITION] = offset
        return offset

    def ack(self, message: Delivered) -> bool:
        message.acked = True
        self._unacked_messages.discard(message)
        self._acked[PARTITION].append(message.offset)
        self._acked_index[PARTITION].add(message.offset)
        return True

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        self.revoked.append(revoked)


class NewOffsets(faust_fixes.CommitsBelowUnfinishedEvents, Acknowledgements):
    pass


def fix_8_transport(fix_8: str) -> SimpleNamespace:
    return SimpleNamespace(disabled=frozenset() if fix_8 == "on" else {8})


@pytest.mark.parametrize("fix_8", ["on", "off"])
def test_no_commit_passes_an_event_still_being_answered(fix_8):
    consumer = NewOffsets(committed=11, transport=fix_8_transport(fix_8))
    slow, fast, faster = consumer.deliver(11), consumer.deliver(12), consumer.deliver(13)
    consumer.ack(fast)
    consumer.ack(faster)
    if fix_8 == "off":
        # Faust lets one missing offset pass, taking it for a transaction marker.
        assert consumer.commit() == 14
        return
    assert consumer.commit() is None  # 11 is not done
    assert consumer._acked[PARTITION] == [12, 13]  # kept for the commit after it
    consumer.ack(slow)
    assert consumer.commit() == 14


def test_commits_go_up_to_the_first_unfinished_event():
    consumer = NewOffsets(committed=11)
    done = [consumer.deliver(offset) for offset in (11, 12)]
    unfinished = consumer.deliver(13)
    later = consumer.deliver(14)
    for message in (*done, later):
        consumer.ack(message)
    assert consumer.commit() == 13
    consumer.ack(unfinished)
    assert consumer.commit() == 15


@pytest.mark.parametrize("fix_8", ["on", "off"])
@pytest.mark.parametrize("committed", [None, 11])
def test_an_event_a_stop_cancelled_still_holds_the_commits(fix_8, committed):
    """A stop cancels the events in flight; once garbage, they leave Faust's WeakSet."""
    consumer = NewOffsets(committed=committed, transport=fix_8_transport(fix_8))
    cancelled = consumer.deliver(11)
    for offset in (12, 13):
        consumer.ack(consumer.deliver(offset))
    del cancelled
    gc.collect()
    if fix_8 == "off":
        assert not consumer._unacked_messages  # garbage, so forgotten
        assert consumer.commit() == 14  # past the cancelled event: lost
        return
    assert consumer.commit() is None  # stays below the cancelled event


@pytest.mark.parametrize("in_transaction", [True, False])
def test_answers_behind_an_unfinished_event_commit_their_transaction_at_it(in_transaction):
    """Under exactly_once the answers acknowledged behind a long generation are in the
    partition's open transaction: it commits, at the unfinished event's offset."""
    consumer = NewOffsets(committed=11, in_transaction=in_transaction)
    slow = consumer.deliver(11)
    consumer.ack(consumer.deliver(12))
    assert consumer.commit() == (11 if in_transaction else None)
    assert consumer.commit() is None  # nothing new to commit
    consumer.ack(consumer.deliver(13))
    assert consumer.commit() == (11 if in_transaction else None)
    consumer.ack(slow)
    assert consumer.commit() == 14


def test_a_never_committed_partition_held_by_an_unfinished_event_commits_at_it():
    consumer = NewOffsets(committed=None, in_transaction=True)
    consumer.deliver(0)
    consumer.ack(consumer.deliver(1))
    assert consumer.commit() == 0


def test_a_revoked_partitions_unfinished_events_are_forgotten_after_the_revocation():
    consumer = NewOffsets(committed=11)
    consumer.deliver(11)
    other = TP("chat", 1)
    consumer.unacked.add(Delivered(other, 5))
    asyncio.run(consumer.on_partitions_revoked({PARTITION}))
    assert consumer.revoked == [{PARTITION}]  # Faust's revocation (its commit) came first
    assert consumer._held.first_unfinished(PARTITION, None) is None
    assert consumer._held.first_unfinished(other, None) == 5


CHANGELOG = TP("app-conversation-history-changelog", 0)


def record(offset: int) -> SimpleNamespace:
    return SimpleNamespace(offset=offset)


def test_a_read_runs_from_the_last_record_handed_out_to_the_position():
    # Records 10-12 handed out, then a commit marker at 13: the position is 14.
    read = faust_fixes.changelog_read(None, [record(10), record(11), record(12)], 14)
    assert read == faust_fixes.ChangelogRead(last=12, position=14)
    # A later fetch hands out nothing and moves past more markers: still nothing unread.
    assert faust_fixes.changelog_read(read, [], 16) == (12, 16)
    # No read since the seek and nothing handed out: nothing is known.
    assert faust_fixes.changelog_read(None, [], 16) is None
    assert faust_fixes.changelog_read(read, [record(16)], None) is None


@pytest.mark.parametrize(
    ("applied", "highwater", "read", "recovered"),
    [
        (12, 13, faust_fixes.ChangelogRead(12, 14), True),  # the marker at 13 is all that is left
        (11, 13, faust_fixes.ChangelogRead(12, 14), False),  # record 12 is not applied yet
        (12, 13, faust_fixes.ChangelogRead(12, 13), False),  # the marker was not read past
        (12, 20, faust_fixes.ChangelogRead(12, 14), False),  # more was written since
        (12, 13, None, False),
        (None, 13, faust_fixes.ChangelogRead(12, 14), False),
    ],
)
def test_a_partition_is_recovered_when_nothing_unapplied_lies_before_the_position(
    applied, highwater, read, recovered
):
    assert faust_fixes.read_to_the_end(applied, highwater, read) is recovered


class AioKafkaPositions:
    """The part of aiokafka's subscription state fix 9 reads: a position per partition."""

    def __init__(self) -> None:
        self.positions: dict[TP, int] = {}
        assignment = SimpleNamespace(state_value=self._state)
        self._subscription = SimpleNamespace(subscription=SimpleNamespace(assignment=assignment))

    def _state(self, tp):
        if tp not in self.positions:
            return None
        return SimpleNamespace(has_valid_position=True, position=self.positions[tp])


class FaustFetches:
    """Faust's consumer thread as fix 9 sees it: each fetch hands out the records the test
    queued and moves aiokafka's positions; seeks move them too."""

    def __init__(self, recovery) -> None:
        self.loop = asyncio.get_running_loop()
        self.parent_loop = self.loop
        self.aiokafka = AioKafkaPositions()
        self.consumer = SimpleNamespace(
            transport=ALL_FIXES_ON, _is_changelog_tp=lambda tp: tp.topic.endswith("-changelog")
        )
        self.app = SimpleNamespace(tables=SimpleNamespace(recovery=recovery))
        self.fetches: list[tuple[dict, dict]] = []
        self.__post_init__()

    def __post_init__(self) -> None:
        pass

    def fetch_returns(self, records: dict, positions: dict) -> None:
        self.fetches.append((records, positions))

    async def _fetch_records(self, consumer, active_partitions, timeout=None, max_records=None):
        records, positions = self.fetches.pop(0)
        consumer.positions.update(positions)
        return records

    async def _seek_wait(self, consumer, partitions) -> None:
        consumer.positions.update(partitions)

    def seek(self, partition, offset) -> None:
        self.aiokafka.positions[partition] = offset

    async def fetch(self) -> dict:
        return await self._fetch_records(self.aiokafka, {CHANGELOG, PARTITION})


class NotingReads(faust_fixes.NotesChangelogReads, FaustFetches):
    pass


class MovedRecovery(faust_fixes.EndsWhereTheChangelogEnds):
    """Stands in for the recovery: ``on_changelog_moved`` recorded."""

    def __init__(self) -> None:
        self.moved = 0

    def on_changelog_moved(self) -> None:
        self.moved += 1


async def test_the_consumer_thread_notes_how_far_each_changelog_was_read():
    recovery = MovedRecovery()
    thread = NotingReads(recovery)
    await thread._seek_wait(thread.aiokafka, {CHANGELOG: 10})
    assert thread.changelog_reads == {CHANGELOG: (9, 10)}
    # Records 10-12 and the marker at 13 behind them; the chat partition is not a changelog.
    thread.fetch_returns({CHANGELOG: [record(10), record(11), record(12)]}, {CHANGELOG: 14})
    await thread.fetch()
    assert thread.changelog_reads == {CHANGELOG: (12, 14)}
    await settle()
    assert recovery.moved == 0  # the records themselves reach the recovery
    # The marker behind the last record came in a fetch of its own: nothing else will tell.
    thread.fetch_returns({}, {CHANGELOG: 15})
    await thread.fetch()
    assert thread.changelog_reads == {CHANGELOG: (12, 15)}
    await settle()
    assert recovery.moved == 1
    thread.fetch_returns({}, {CHANGELOG: 15})  # an idle fetch
    await thread.fetch()
    await settle()
    assert recovery.moved == 1


async def test_a_read_starts_afresh_at_every_seek():
    thread = NotingReads(MovedRecovery())
    await thread._seek_wait(thread.aiokafka, {CHANGELOG: 10})
    thread.fetch_returns({CHANGELOG: [record(10)]}, {CHANGELOG: 11})
    await thread.fetch()
    # Seeking forward skips records 11-39: the read from 10 says nothing about them.
    await thread._seek_wait(thread.aiokafka, {CHANGELOG: 40})
    thread.fetch_returns({}, {CHANGELOG: 42})
    await thread.fetch()
    assert thread.changelog_reads == {CHANGELOG: (39, 42)}
    thread.seek(CHANGELOG, 50)
    assert CHANGELOG not in thread.changelog_reads


async def test_with_fix_9_off_the_consumer_thread_notes_nothing():
    thread = NotingReads(MovedRecovery())
    thread.consumer.transport = SimpleNamespace(disabled=frozenset({9}))
    thread.fetch_returns({CHANGELOG: [record(0)]}, {CHANGELOG: 2})
    await thread.fetch()
    assert thread.changelog_reads == {}


class FaustRecovers:
    """Faust's recovery as fix 9 sees it: its own ``need_recovery`` over the active highwaters
    and offsets, its end of a recovery recorded."""

    need_recovery = BaseRecovery.need_recovery
    active_remaining = BaseRecovery.active_remaining

    def __init__(self, reads: dict, transport: SimpleNamespace = ALL_FIXES_ON) -> None:
        self.app = SimpleNamespace(
            transport=transport,
            consumer=SimpleNamespace(_thread=SimpleNamespace(changelog_reads=reads)),
        )
        self.log = SimpleNamespace(info=lambda *args: None)
        self.active_highwaters = Counter()
        self.active_offsets = Counter()
        self.in_recovery = True
        self._signal_recovery_end = None
        self.flushed = False

    def flush_buffers(self) -> None:
        self.flushed = True

    def _set_recovery_ended(self) -> None:
        self.in_recovery = False


class Recovering(faust_fixes.EndsWhereTheChangelogEnds, FaustRecovers):
    pass


@pytest.mark.parametrize("fix_9", ["on", "off"])
def test_a_changelog_ending_in_a_marker_is_recovered_once_read_past_it(fix_9):
    reads = {CHANGELOG: faust_fixes.ChangelogRead(12, 14)}
    transport = SimpleNamespace(disabled=frozenset() if fix_9 == "on" else {9})
    recovery = Recovering(reads, transport)
    recovery.active_highwaters[CHANGELOG] = 13  # Faust's highwater: the marker's offset
    recovery.active_offsets[CHANGELOG] = 11
    assert recovery.need_recovery()  # record 12 is still to be applied
    recovery.active_offsets[CHANGELOG] = 12
    if fix_9 == "off":
        # Faust waits for offset 13, which is never handed out (two idle cycles, then its
        # "Aborted tx until highwater").
        assert recovery.need_recovery()
        return
    assert not recovery.need_recovery()
    assert recovery.active_offsets[CHANGELOG] == 13


async def test_a_move_past_the_last_markers_ends_the_recovery_at_once():
    reads = {CHANGELOG: faust_fixes.ChangelogRead(12, 13)}
    recovery = Recovering(reads)
    recovery.active_highwaters[CHANGELOG] = 13
    recovery.active_offsets[CHANGELOG] = 12  # everything handed out is applied
    # Faust's recovery reading the changelogs, waiting for their end:
    reading = asyncio.ensure_future(recovery.signal_recovery_end.wait())
    await settle()
    recovery.on_changelog_moved()
    await settle()
    assert recovery.in_recovery and not reading.done()
    reads[CHANGELOG] = faust_fixes.ChangelogRead(12, 14)  # the fetch that passed the marker
    recovery.on_changelog_moved()
    assert recovery.flushed and not recovery.in_recovery
    assert await asyncio.wait_for(reading, 1) is True


def test_a_move_reported_before_the_recovery_reads_ends_nothing():
    """A rebalance came between the fetch and the report: the new recovery, not reading yet,
    must not find its end already signalled."""
    recovery = Recovering({CHANGELOG: faust_fixes.ChangelogRead(12, 14)})
    recovery.active_highwaters[CHANGELOG] = 13
    recovery.active_offsets[CHANGELOG] = 12
    recovery.on_changelog_moved()
    assert recovery.in_recovery and not recovery.signal_recovery_end.is_set()


class FakeStore:
    """A table store's persisted offsets (RocksDB keeps one per partition)."""

    def __init__(self, persisted: dict | None = None) -> None:
        self.persisted: dict[TP, int] = dict(persisted or {})

    def persisted_offset(self, tp):
        return self.persisted.get(tp)

    def set_persisted_offset(self, tp, offset) -> None:
        self.persisted[tp] = offset


CHAT_1, CHAT_2 = TP("chat", 1), TP("chat", 2)
CHANGELOG_1 = TP("marvin-conversation-history-changelog", 1)
CHANGELOG_2 = TP("marvin-conversation-history-changelog", 2)


class FaustTransactionCommits:
    """Faust's transaction manager as fix 10 sees it: ``commit`` recorded, failing as told."""

    transactional_id_format = "{group_id}-{tpg.group}-{tpg.partition}"

    def __init__(self, transport: SimpleNamespace = ALL_FIXES_ON, crash: bool = False) -> None:
        self.transport = transport
        self.crash = crash
        self.app = SimpleNamespace(
            conf=SimpleNamespace(id="marvin"),
            assignor=SimpleNamespace(group_for_topic=lambda topic: 0),
            tables=SimpleNamespace(_pending_persisted_offsets={}),
            crashed=False,
        )
        self.producer = SimpleNamespace(
            _transaction_producers={"marvin-0-1": object(), "marvin-0-2": object()}
        )
        self.commits: list[dict] = []

    async def commit(self, offsets, start_new_transaction=True) -> bool:
        self.commits.append(dict(offsets))
        if self.crash:  # as Faust on ProducerFenced: crash the app, return True
            self.app.crashed = True
        return True

    async def on_rebalance(self, assigned, revoked, newly_assigned) -> None:
        pass

    def _tps_to_transactional_ids(self, tps) -> set[str]:
        return {f"marvin-0-{tp.partition}" for tp in tps}


class RecordingOffsets(faust_fixes.RecordsCommittedChangelogOffsets, FaustTransactionCommits):
    pass


@pytest.mark.parametrize("fix_10", ["on", "off"])
async def test_a_commit_records_the_changelog_offsets_written_in_its_transaction(fix_10):
    transport = SimpleNamespace(disabled=frozenset() if fix_10 == "on" else {10})
    manager = RecordingOffsets(transport)
    store = FakeStore()
    pending = manager.app.tables._pending_persisted_offsets
    # What Faust's _on_changelog_sent files under exactly_once: the changelog partition.
    pending[CHANGELOG_1] = (store, 41)
    pending[CHANGELOG_2] = (store, 7)
    assert await manager.commit({CHAT_1: 100}) is True
    assert manager.commits == [{CHAT_1: 100}]
    if fix_10 == "off":
        assert store.persisted == {}  # Faust's own on_commit looks under the chat partition
        return
    assert store.persisted == {CHANGELOG_1: 41}  # partition 2's transaction is still open
    assert pending == {CHANGELOG_2: (store, 7)}


def test_faust_looks_the_changelog_offsets_up_under_the_source_partition():
    """robinhood/faust#599, what fix 10 is for, in Faust's own table manager."""
    tables = SimpleNamespace(_pending_persisted_offsets={})
    store = FakeStore()
    BaseTableManager.persist_offset_on_commit(tables, store, CHANGELOG_1, 41)
    tables.on_commit_tp = lambda tp: BaseTableManager.on_commit_tp(tables, tp)
    BaseTableManager.on_commit(tables, {CHAT_1: 100})
    assert store.persisted == {}


async def test_a_failed_commit_records_nothing():
    manager = RecordingOffsets(crash=True)
    store = FakeStore()
    manager.app.tables._pending_persisted_offsets[CHANGELOG_1] = (store, 41)
    await manager.commit({CHAT_1: 100})
    assert store.persisted == {}


async def test_a_transaction_without_its_producer_records_nothing():
    manager = RecordingOffsets()
    del manager.producer._transaction_producers["marvin-0-1"]
    store = FakeStore()
    manager.app.tables._pending_persisted_offsets[CHANGELOG_1] = (store, 41)
    await manager.commit({CHAT_1: 100})
    assert store.persisted == {}


async def test_a_recorded_offset_never_moves_back():
    manager = RecordingOffsets()
    store = FakeStore({CHANGELOG_1: 50})  # a recovery applied up to 50 since
    manager.app.tables._pending_persisted_offsets[CHANGELOG_1] = (store, 41)
    await manager.commit({CHAT_1: 100})
    assert store.persisted == {CHANGELOG_1: 50}


async def test_a_revoked_partitions_writes_are_not_recorded():
    manager = RecordingOffsets()
    store = FakeStore()
    pending = manager.app.tables._pending_persisted_offsets
    pending[CHANGELOG_1] = (store, 41)
    pending[CHANGELOG_2] = (store, 7)
    await manager.on_rebalance({CHAT_1, CHANGELOG_1}, {CHAT_2, CHANGELOG_2}, set())
    assert pending == {CHANGELOG_1: (store, 41)}


async def test_the_broker_holds_an_empty_fetch_briefly(unit_app):
    thread = unit_app.consumer._thread
    consumer = thread._create_worker_consumer(unit_app.transport)
    assert consumer._fetch_max_wait_ms == faust_fixes.FETCH_MAX_WAIT_MS == 100


async def test_with_fix_11_off_the_broker_holds_an_empty_fetch_for_faust_s_1_5_s(
    unit_app, monkeypatch
):
    monkeypatch.setattr(unit_app.transport, "disabled", frozenset({11}))
    thread = unit_app.consumer._thread
    consumer = thread._create_worker_consumer(unit_app.transport)
    assert consumer._fetch_max_wait_ms == 1500
