"""Which stored conversations are idle, cheaply: the expiry sweep's index (pure, no Faust).

:class:`ActivityIndex` holds, for each table partition a worker owns, every stored conversation's
last activity (its newest turn's timestamp, ns), and a heap ordered by it. The agent updates it
on each history write and deletion; after a rebalance a partition's entries are loaded from the
table once (``lifecycle.Expiry``). A sweep then pops only what is due: its cost follows what
expires, not what is stored. Heap entries are never searched for: an entry whose time is no
longer its conversation's (touched again, deleted, partition dropped) is skipped when popped,
and the heap is rebuilt when such entries outnumber the live ones.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from .conversation import Turn

# Below this size the heap is never rebuilt: stale entries cost little.
COMPACT_MIN = 1024


def last_activity(history: Sequence[Turn]) -> int | None:
    """A stored conversation's last activity: its newest turn's timestamp (ns), that is the
    worker's clock when it replied, or for a conversation that holds only its greeting the
    greeting's ``Timestamp``. None for no history."""
    return history[-1]["timestamp"] if history else None


class Due(NamedTuple):
    partition: int
    conversation_id: str
    last_activity: int  # ns


class ActivityIndex:
    """Last activity of each stored conversation, per partition; the due ones first.

    ``track_due=False`` (no expiry) keeps the per-partition entries only, for the count.
    """

    def __init__(self, track_due: bool = True) -> None:
        self.track_due = track_due
        self._last: dict[int, dict[str, int]] = {}
        self._heap: list[tuple[int, int, str]] = []  # (last activity, partition, id)

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._last.values())

    @property
    def partitions(self) -> set[int]:
        return set(self._last)

    def last_activity(self, partition: int, conversation_id: str) -> int | None:
        return self._last.get(partition, {}).get(conversation_id)

    def touch(self, partition: int, conversation_id: str, last_activity: int) -> None:
        """The conversation's history was written; its newest turn is ``last_activity``."""
        entries = self._last.setdefault(partition, {})
        if entries.get(conversation_id) == last_activity:
            return
        entries[conversation_id] = last_activity
        if self.track_due:
            heapq.heappush(self._heap, (last_activity, partition, conversation_id))
            self._maybe_compact()

    def load(self, partition: int, stored: Iterable[tuple[str, int]]) -> None:
        """Add ``(id, last activity)`` pairs read from the table. An entry already there came
        from the agent since the read began, and is newer: it stays."""
        entries = self._last.setdefault(partition, {})
        for conversation_id, last_activity in stored:
            if conversation_id not in entries:
                self.touch(partition, conversation_id, last_activity)

    def discard(self, partition: int, conversation_id: str) -> None:
        """The conversation's history was deleted."""
        self._last.get(partition, {}).pop(conversation_id, None)

    def drop(self, partition: int) -> None:
        """The partition is no longer this worker's to expire."""
        self._last.pop(partition, None)
        self._maybe_compact()

    def due(self, cutoff: int, limit: int) -> list[Due]:
        """Up to ``limit`` conversations idle since before ``cutoff`` (ns), oldest first,
        taken off the heap (they stay counted until discarded; :meth:`retry` puts back those
        whose deletion could not be asked for)."""
        found: list[Due] = []
        heap = self._heap
        while heap and len(found) < limit and heap[0][0] < cutoff:
            last_activity, partition, conversation_id = heapq.heappop(heap)
            if self.last_activity(partition, conversation_id) == last_activity:
                found.append(Due(partition, conversation_id, last_activity))
        return found

    def retry(self, entries: Iterable[Due]) -> None:
        for entry in entries:
            if self.last_activity(entry.partition, entry.conversation_id) == entry.last_activity:
                heapq.heappush(
                    self._heap, (entry.last_activity, entry.partition, entry.conversation_id)
                )

    def _maybe_compact(self) -> None:
        live = len(self)
        if len(self._heap) > max(COMPACT_MIN, 2 * live):
            self._heap = [
                (last_activity, partition, conversation_id)
                for partition, entries in self._last.items()
                for conversation_id, last_activity in entries.items()
            ]
            heapq.heapify(self._heap)
