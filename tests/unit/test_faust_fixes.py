"""The Faust fixes in marvin_faust.faust_fixes that can be shown without a broker: each fix is
a mixin, put here on top of a stand-in for the Faust class it fixes.

Their effect on real workers is shown by tests/e2e/test_reliability.py and
tests/e2e/test_client_families.py.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from faust.streams import _current_event
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
    """Faust's consumer as fix 8 sees it: its own ``_new_offset`` over real bookkeeping."""

    _new_offset = BaseConsumer._new_offset

    def __init__(self, committed: int, transport: SimpleNamespace = ALL_FIXES_ON) -> None:
        self.transport = transport
        self._committed_offset = defaultdict(lambda: committed)
        self._acked: defaultdict[TP, list[int]] = defaultdict(list)
        self._acked_index: defaultdict[TP, set[int]] = defaultdict(set)
        self._gap: defaultdict[TP, IntervalTree] = defaultdict(IntervalTree)
        self._unacked_messages: set = set()

    def deliver(self, offset: int) -> Delivered:
        message = Delivered(PARTITION, offset)
        self._unacked_messages.add(message)
        return message

    def commit(self) -> int | None:
        """The offset a commit now would commit, remembered as committed (as Faust does)."""
        offset = self._new_offset(PARTITION)
        if offset is not None:
            self._committed_offset[PARTITION] = offset
        return offset

    def ack(self, message: Delivered) -> None:
        message.acked = True
        self._unacked_messages.discard(message)
        self._acked[PARTITION].append(message.offset)
        self._acked_index[PARTITION].add(message.offset)


class NewOffsets(faust_fixes.CommitsBelowUnfinishedEvents, Acknowledgements):
    pass


@pytest.mark.parametrize("fix_8", ["on", "off"])
def test_no_commit_passes_an_event_still_being_answered(fix_8):
    transport = SimpleNamespace(disabled=frozenset() if fix_8 == "on" else {8})
    consumer = NewOffsets(committed=11, transport=transport)
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
