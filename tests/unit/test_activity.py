"""The expiry sweep's index: last activity per partition, the due ones first."""

from __future__ import annotations

from marvin_faust.activity import COMPACT_MIN, ActivityIndex, Due, last_activity
from marvin_faust.conversation import make_turn


def test_last_activity_is_the_newest_turns_timestamp():
    assert last_activity([]) is None
    history = [make_turn("human", "hi", 5, "m1"), make_turn("AI", "no", 9, "r1")]
    assert last_activity(history) == 9


def test_due_gives_the_idle_ones_oldest_first_and_only_once():
    index = ActivityIndex()
    index.touch(0, "old", 10)
    index.touch(1, "older", 5)
    index.touch(0, "live", 100)
    assert index.due(cutoff=50, limit=10) == [Due(1, "older", 5), Due(0, "old", 10)]
    assert index.due(cutoff=50, limit=10) == []
    assert len(index) == 3  # counted until the agent deletes them
    index.discard(1, "older")
    index.discard(0, "old")
    assert len(index) == 1


def test_a_touched_conversation_is_due_by_its_new_activity_only():
    index = ActivityIndex()
    index.touch(0, "c", 10)
    index.touch(0, "c", 60)
    assert index.due(cutoff=50, limit=10) == []
    assert index.due(cutoff=70, limit=10) == [Due(0, "c", 60)]


def test_due_stops_at_the_limit_and_retry_puts_entries_back():
    index = ActivityIndex()
    for n in range(5):
        index.touch(0, f"c{n}", n)
    first = index.due(cutoff=100, limit=2)
    assert [d.conversation_id for d in first] == ["c0", "c1"]
    index.retry(first)
    assert [d.conversation_id for d in index.due(cutoff=100, limit=10)] == [
        "c0",
        "c1",
        "c2",
        "c3",
        "c4",
    ]


def test_retry_skips_what_changed_meanwhile():
    index = ActivityIndex()
    index.touch(0, "c", 1)
    due = index.due(cutoff=10, limit=10)
    index.touch(0, "c", 20)
    index.retry(due)
    assert index.due(cutoff=10, limit=10) == []


def test_a_dropped_partition_is_neither_due_nor_counted():
    index = ActivityIndex()
    index.touch(0, "mine", 1)
    index.touch(1, "gone", 1)
    index.drop(1)
    assert index.partitions == {0}
    assert index.due(cutoff=10, limit=10) == [Due(0, "mine", 1)]


def test_load_keeps_what_the_agent_wrote_since():
    index = ActivityIndex()
    index.touch(0, "c", 50)  # the agent, while the partition was being read
    index.load(0, [("c", 10), ("d", 20)])
    assert index.last_activity(0, "c") == 50
    assert index.last_activity(0, "d") == 20


def test_without_expiry_only_the_count_is_kept():
    index = ActivityIndex(track_due=False)
    index.touch(0, "c", 1)
    assert len(index) == 1
    assert index.due(cutoff=10, limit=10) == []


def test_stale_heap_entries_are_compacted_away():
    index = ActivityIndex()
    for n in range(3 * COMPACT_MIN):
        index.touch(0, "busy", n)
    assert len(index._heap) <= COMPACT_MIN + 1
    assert index.due(cutoff=10**9, limit=10) == [Due(0, "busy", 3 * COMPACT_MIN - 1)]
