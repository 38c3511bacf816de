"""The Faust fixes in marvin_faust.patches that can be shown without a broker.

Their effect on real workers is shown by tests/test_reliability.py.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from marvin_faust import patches


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """The lock and the flag are per process; every test gets its own."""
    monkeypatch.setattr(patches, "_commit_barrier", asyncio.Lock())
    monkeypatch.setattr(patches, "_final_commit_begun", asyncio.Event())
    monkeypatch.setattr(patches, "_final_commit_done", asyncio.Event())


def fake_app(*, stopping: bool = False, tables: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(should_stop=stopping, in_transaction=False, tables=tables or {})


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


@pytest.fixture()
def recorded_commits(monkeypatch) -> list[bool]:
    """Faust's commit replaced by a recorder (of ``start_new_transaction``); its final commit
    commits through the patched ``commit``, as Faust's does."""
    commits: list[bool] = []

    async def original_commit(self, topics=None, start_new_transaction=True):
        commits.append(start_new_transaction)
        return True

    async def original_end(self):
        await patches._commit_between_events(self, start_new_transaction=False)

    monkeypatch.setattr(patches, "_original_commit", original_commit)
    monkeypatch.setattr(patches, "_original_commit_and_end_transactions", original_end)
    return commits


async def test_a_commit_waits_until_the_event_has_written_everything(recorded_commits):
    consumer = SimpleNamespace(app=fake_app())
    async with patches.writes_of_one_event():
        commit = asyncio.ensure_future(patches._commit_between_events(consumer))
        await settle()
        assert not recorded_commits, "a commit ran between the writes of one event"
    assert await commit is True
    assert recorded_commits == [True]


class SlowTable:
    """A table whose buffered writes are delivered when the test says so."""

    def __init__(self) -> None:
        self.delivered = asyncio.get_running_loop().create_future()

    async def wait_written(self) -> None:
        await self.delivered


async def test_a_commit_first_waits_until_the_table_writes_are_delivered(recorded_commits):
    table = SlowTable()
    consumer = SimpleNamespace(app=fake_app(tables={"history": table, "plain": object()}))
    commit = asyncio.ensure_future(patches._commit_between_events(consumer))
    await settle()
    assert not recorded_commits, "committed before the table write was delivered"
    # Meanwhile no event writes: what the commit waits for is all it commits.
    wrote = asyncio.Event()

    async def handle_one_event() -> None:
        async with patches.writes_of_one_event():
            wrote.set()

    handler = asyncio.ensure_future(handle_one_event())
    await settle()
    assert not wrote.is_set()
    table.delivered.set_result(None)
    assert await commit is True
    assert recorded_commits == [True]
    await handler
    assert wrote.is_set()


async def test_a_commit_whose_table_write_failed_raises_and_commits_nothing(recorded_commits):
    table = SlowTable()
    table.delivered.set_exception(RuntimeError("ProducerFenced"))
    consumer = SimpleNamespace(app=fake_app(tables={"history": table}))
    with pytest.raises(RuntimeError, match="ProducerFenced"):
        await patches._commit_between_events(consumer)
    assert not recorded_commits
    assert not patches._commit_barrier.locked()


async def test_a_rebalance_ending_the_transactions_does_not_stop_the_writes(monkeypatch):
    async def original_end(self):
        return None

    monkeypatch.setattr(patches, "_original_commit_and_end_transactions", original_end)
    await patches._flag_and_commit_and_end_transactions(SimpleNamespace(app=fake_app()))
    wrote = False
    async with patches.writes_of_one_event():
        wrote = True
    assert wrote


async def test_nothing_is_written_after_the_final_commit_of_a_stop(monkeypatch):
    async def original_end(self):
        return None

    monkeypatch.setattr(patches, "_original_commit_and_end_transactions", original_end)
    stopping = fake_app(stopping=True)
    await patches._flag_and_commit_and_end_transactions(SimpleNamespace(app=stopping))
    wrote = asyncio.Event()

    async def handle_one_event() -> None:
        async with patches.writes_of_one_event():
            wrote.set()

    handler = asyncio.ensure_future(handle_one_event())
    await settle()
    assert not wrote.is_set() and not handler.done()
    # It waits outside the lock: another commit (Faust's consumer stop) still goes through.
    assert not patches._commit_barrier.locked()
    handler.cancel()  # what the worker's stop does to the agent
    with pytest.raises(asyncio.CancelledError):
        await handler
    assert not wrote.is_set()


async def test_no_commit_follows_the_final_commit_of_a_stop(recorded_commits):
    consumer = SimpleNamespace(app=fake_app(stopping=True))
    await patches._flag_and_commit_and_end_transactions(consumer)
    assert recorded_commits == [False]  # the final commit itself went through
    assert await patches._commit_between_events(consumer) is False  # the timer's next one
    assert recorded_commits == [False]


async def test_after_a_rebalance_commits_go_on(recorded_commits):
    consumer = SimpleNamespace(app=fake_app())
    await patches._flag_and_commit_and_end_transactions(consumer)
    assert await patches._commit_between_events(consumer) is True
    assert recorded_commits == [False, True]


class FlowingConsumer:
    """The flow switches of Faust's consumer, and what the seek saw of them."""

    def __init__(self, flowing: bool) -> None:
        self.flow_active = flowing
        self.flow_during_seek: list[bool] = []

    def stop_flow(self) -> None:
        self.flow_active = False

    def resume_flow(self) -> None:
        self.flow_active = True


async def test_the_seek_runs_with_the_flow_stopped_and_restores_it(monkeypatch):
    async def original_seek(self):
        self.flow_during_seek.append(self.flow_active)

    monkeypatch.setattr(patches, "_original_perform_seek", original_seek)
    flowing, stopped = FlowingConsumer(True), FlowingConsumer(False)
    await patches._perform_seek_with_the_flow_stopped(flowing)
    await patches._perform_seek_with_the_flow_stopped(stopped)
    assert flowing.flow_during_seek == [False] and flowing.flow_active
    assert stopped.flow_during_seek == [False] and not stopped.flow_active


async def test_the_history_table_waits_for_its_changelog_writes(monkeypatch):
    from faust.tables.base import Collection

    from marvin_faust.tables import history

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


class RevokingConsumer:
    """Faust's per-partition consumer bookkeeping, with an app handler recording the acks it
    would commit."""

    def __init__(self, tp) -> None:
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


async def test_a_revocation_commits_the_acks_before_forgetting_them():
    from faust.types import TP

    revoked, kept = TP("chat", 0), TP("chat", 1)
    consumer = RevokingConsumer(revoked)
    consumer._acked[kept] = [3]
    await patches._on_partitions_revoked_after_their_commit(consumer, {revoked})
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


class RecordingProducer:
    def __init__(self) -> None:
        self.sent: list[tuple] = []

    async def send(self, topic, key, value, partition, timestamp, headers, *, transactional_id):
        self.sent.append((topic, partition, transactional_id))
        return asyncio.get_running_loop().create_future()


def transaction_manager(consumer_partitions: dict[str, int]):
    """An EventTransactionManager on app "marvin" whose topics are all in assignor group 0;
    the consumer knows ``consumer_partitions`` (topic -> the partition a key hashes to)."""
    manager = patches.EventTransactionManager.__new__(patches.EventTransactionManager)
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
    import weakref

    from faust.streams import _current_event
    from faust.types import TP

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
