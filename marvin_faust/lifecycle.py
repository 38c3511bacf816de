"""Conversation lifecycle on the worker: retention (expiry) and deletion on request.

There is one way to delete a conversation: a *forget* record on the chat topic
(``models.Forget``), which the agent applies in order with that conversation's messages, inside
the worker's Kafka transaction: ``del history[id]`` writes a tombstone to the changelog, so the
compacted changelog, every standby and every later recovery forget it too. ``marvin-faust
forget`` and ``DELETE /conversations/{id}/`` send one to every partition; the expiry sweep sends
one per idle conversation to the partition that holds it.

:class:`Lifecycle` (a dependency of the app) holds what the worker needs for that:

- the :class:`~marvin_faust.activity.ActivityIndex` of the partitions it owns, updated by the
  agent on every write and deletion, and loaded from the table (in slices, between which the
  event loop runs) for each partition it takes over after a rebalance or at start;
- the sweep, every ``MARVIN_EXPIRY_INTERVAL`` seconds when ``MARVIN_CONVERSATION_TTL`` > 0: an
  expiry record for each conversation idle for longer, carrying the last activity it saw;
- a producer (a :class:`~marvin_faust.client.ChatClient`), and the futures the DELETE view
  waits on until the agent has applied its records.

The rule for a race between the sweep and a new message: the agent deletes an expired
conversation only if its newest turn is still the one the sweep saw. A message that reaches the
chat topic before the expiry record keeps the conversation, history and all; one that reaches it
after starts a fresh conversation. A worker killed mid-sweep loses nothing that was not due: the
records it sent are applied by that rule, and the next owner of the partition sweeps again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from faust.stores import rocksdb
from mode import Service

from .activity import ActivityIndex, Due, last_activity
from .client import ChatClient, ChatClientError
from .models import Forget, ForgetReason, make_forget, new_message_id, now_ns

if TYPE_CHECKING:
    from .app import MarvinApp

log = logging.getLogger(__name__)

# Conversations loaded into the index, or expired, between two turns of the event loop.
SLICE = 500


class Lifecycle(Service):
    def __init__(self, app: MarvinApp, **kwargs: Any) -> None:
        self.app = app
        self.settings = app.settings
        self.index = ActivityIndex(track_due=app.settings.conversation_ttl > 0)
        self._client: ChatClient | None = None
        self._loads: dict[int, asyncio.Task[None]] = {}
        self._applied: dict[str, asyncio.Future[None]] = {}
        app.metrics.conversations_stored.set_function(lambda: len(self.index))
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        client = ChatClient(self.settings, listen=False)
        await client.__aenter__()
        self._client = client

    async def on_stop(self) -> None:
        for task in self._loads.values():
            task.cancel()
        if self._client is not None:
            await self._client.__aexit__(None, None, None)

    # -- The agent's side ----------------------------------------------------------------------

    def written(self, partition: int | None, conversation_id: str, history: list) -> None:
        """The agent stored ``history`` for the conversation (on ``partition``)."""
        newest = last_activity(history)
        if partition is not None and newest is not None:
            self.index.touch(partition, conversation_id, newest)

    def deleted(self, partition: int | None, conversation_id: str) -> None:
        if partition is not None:
            self.index.discard(partition, conversation_id)

    def applied(self, message_id: str | None) -> None:
        """The agent is done with the forget record ``message_id``, deleted or not."""
        waiting = self._applied.pop(message_id, None) if message_id else None
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    # -- Deletion on request (the DELETE view) --------------------------------------------------

    async def forget(self, conversation_id: str, wait: float) -> bool:
        """Send the forget records; wait up to ``wait`` s for this worker's agent to apply
        those on the partitions it owns. Returns whether it did in time."""
        if self._client is None:
            raise ChatClientError("the worker is not started")
        planned = await self._client.forget_records(conversation_id)
        owned = self._owned_partitions()
        loop = asyncio.get_running_loop()
        # Waited for before they are sent: the agent can apply one before the send returns.
        applied = [
            self._applied.setdefault(message_id, loop.create_future())
            for _, partition, message_id in planned
            if partition in owned
        ]
        try:
            await self._client.send_forgets(planned)
            async with asyncio.timeout(wait):
                await asyncio.gather(*applied)
            return True
        except TimeoutError:
            return False
        finally:
            for *_, message_id in planned:
                self._applied.pop(message_id, None)

    def _owned_partitions(self) -> set[int]:
        topic = self.app.chat_topics.chat.get_topic_name()
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == topic}

    # -- Expiry --------------------------------------------------------------------------------

    async def on_recovered(self) -> None:
        """After each recovery (start, rebalance): drop the partitions no longer owned, load
        the newly owned ones from the table, in the background."""
        topic = self.app.history.changelog_topic_name
        active = {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == topic}
        for partition in self.index.partitions | set(self._loads):
            if partition not in active:
                if (task := self._loads.pop(partition, None)) is not None:
                    task.cancel()
                self.index.drop(partition)
        for partition in active - set(self._loads):
            task = self._loads[partition] = asyncio.create_task(self._load(partition))
            task.add_done_callback(_log_failure)

    async def _load(self, partition: int) -> None:
        loop = asyncio.get_running_loop()
        started, loaded = loop.time(), 0
        stored = stored_histories(self.app.history, partition)
        while chunk := list(itertools.islice(stored, SLICE)):
            self.index.load(
                partition,
                [
                    (cid, newest)
                    for cid, history in chunk
                    if (newest := last_activity(history)) is not None
                ],
            )
            loaded += len(chunk)
            await asyncio.sleep(0)  # let the agent, the views and the commits run
        log.info(
            "Last activity of %d conversations on partition %d loaded in %.2fs",
            loaded,
            partition,
            loop.time() - started,
        )

    async def sweep(self) -> int:
        """Ask for the deletion of every conversation idle for longer than the TTL; returns
        how many were asked for."""
        if self._client is None:
            return 0
        cutoff = now_ns() - int(self.settings.conversation_ttl * 1e9)
        asked = 0
        while due := self.index.due(cutoff, SLICE):
            try:
                await self._client.send_forgets(
                    [(expiry(entry), entry.partition, new_message_id()) for entry in due]
                )
            except ChatClientError as exc:
                self.index.retry(due)  # the next sweep tries again
                log.warning("Expiry sweep stopped: %s", exc)
                break
            asked += len(due)
        if asked:
            log.info("Expiry sweep: asked to delete %d idle conversations", asked)
        return asked


def expiry(entry: Due) -> Forget:
    return make_forget(entry.conversation_id, ForgetReason.EXPIRED, entry.last_activity)


def stored_histories(table: Any, partition: int) -> Iterator[tuple[str, list]]:
    """Every ``(conversation id, history)`` of one partition of the table's local store.

    Faust has no public way to read one partition: this reads its store as Faust 0.15.3 keeps
    it (``faust_fixes.check_faust_version`` pins that version). RocksDB: the partition's own
    database; the memory store (tests): the keys it recovered for that partition.
    """
    store = table.data
    if isinstance(store, rocksdb.Store):
        db = store._dbs.get(partition)
        if db is None:
            return
        for key, value in store._visible_items(db):
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                yield key.decode(), json.loads(value)
        return
    for key, where in list(getattr(store, "_key_partition", {}).items()):
        if where == partition and (history := store.data.get(key)):
            yield key.decode() if isinstance(key, bytes) else key, history


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("Loading the last activity of conversations failed: %r", exc)
