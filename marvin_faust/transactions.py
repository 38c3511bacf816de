"""One event's writes commit together: the barrier between the agent and Faust's commits.

Faust commits on a timer, between any two awaits of an agent. The agent writes one event's
records (history, reply, dead letter) inside :meth:`CommitBarrier.writes_of_one_event`; the
worker's consumer (``faust_fixes.Consumer``, fix 4) commits inside
:meth:`CommitBarrier.between_events`, so no commit falls between the records of one event. Once
a stop's final commit has begun, nothing more is written: the next owner of the partition
handles the event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class CommitBarrier:
    """One per app (one consumer, one event loop)."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._final_commit_begun = asyncio.Event()
        self._final_commit_ended = asyncio.Event()

    @asynccontextmanager
    async def writes_of_one_event(self) -> AsyncIterator[None]:
        """Write one event's records with no commit in between.

        Once the final commit has begun this never enters: it waits until the stop cancels
        the agent, and the event is left to the next owner of its partition.
        """
        async with self._lock:
            if not self._final_commit_begun.is_set():
                yield
                return
        await asyncio.Event().wait()  # outside the lock, so the final commit can go on

    @asynccontextmanager
    async def between_events(self) -> AsyncIterator[bool]:
        """Held by a commit; yields whether it may still commit (not after the final one)."""
        async with self._lock:
            yield not self._final_commit_ended.is_set()

    def final_commit_begins(self) -> None:
        self._final_commit_begun.set()

    def final_commit_ended(self) -> None:
        self._final_commit_ended.set()
