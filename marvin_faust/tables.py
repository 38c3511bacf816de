"""The conversation history table: RocksDB locally, a compacted changelog topic in Kafka.

Key: the conversation id (the chat topic's key, so the table is co-partitioned with it).
Value: a list of :class:`~marvin_faust.conversation.Turn` dicts, oldest first, bounded by
``MARVIN_MAX_STORED_TURNS``. Always assign a new list: Faust only writes the changelog on
assignment, never on in-place mutation. A deleted conversation (``del table[id]``) is a
tombstone (null value) in the changelog.

The changelog is compacted (Faust's default for tables, ``cleanup.policy=compact``); at its
creation it also gets :func:`changelog_config`: how long a tombstone outlives the compaction
that dropped the values before it, and how long a replaced or deleted value may wait for
compaction at most. An existing changelog keeps the configuration it was created with.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.types import FutureMessage

from .settings import Settings


class HistoryTable(faust.Table):
    """A table whose changelog writes can be awaited.

    A write is queued in Faust's producer buffer and reaches Kafka later; under exactly_once it
    joins whatever transaction is open by then, possibly the one after the reply's; under
    at_least_once the offset could commit before it is delivered. Every commit awaits
    :meth:`wait_written` first (``marvin_faust.faust_fixes``, fix 4).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unwritten: list[FutureMessage] = []

    def send_changelog(self, *args: Any, **kwargs: Any) -> FutureMessage:
        future = super().send_changelog(*args, **kwargs)
        self._unwritten.append(future)
        return future

    async def wait_written(self) -> None:
        """Wait until every changelog write made so far has been delivered to Kafka."""
        while self._unwritten:
            await self._unwritten.pop(0)


def changelog_config(settings: Settings) -> dict[str, int]:
    """Topic configuration of the history changelog, besides ``cleanup.policy=compact``."""
    return {
        "delete.retention.ms": int(settings.changelog_delete_retention * 1000),
        # Without it (Kafka's default: forever) a segment is compacted only once dirty enough,
        # and a deleted conversation's values could stay in it indefinitely.
        "max.compaction.lag.ms": int(settings.changelog_compaction_lag * 1000),
    }


def declare_history(app: faust.App, settings: Settings) -> HistoryTable:
    return app.tables.add(
        HistoryTable(
            app,
            name="conversation-history",
            default=list,
            beacon=app.tables.beacon,
            # bytes -> Faust's "raw" key codec: the changelog key is the conversation id's UTF-8
            # bytes, exactly the chat topic's key, so table_route hashes it to the same
            # partition. (Any other key type gets JSON, a quoted key, and requests get routed
            # to the wrong worker.) The table is still indexed with str ids: the raw codec
            # encodes them.
            key_type=bytes,
            partitions=settings.partitions,
            extra_topic_configs=changelog_config(settings),
            help="Conversation id -> list of turns (role, text, timestamp, message_id).",
        )
    )
