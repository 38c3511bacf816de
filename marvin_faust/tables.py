"""The conversation history table: RocksDB locally, a compacted changelog topic in Kafka.

Key: the conversation id (the chat topic's key, so the table is co-partitioned with it).
Value: a list of :class:`~marvin_faust.conversation.Turn` dicts, oldest first, bounded by
``MARVIN_MAX_STORED_TURNS``. Always assign a new list: Faust only writes the changelog on
assignment, never on in-place mutation.
"""

from __future__ import annotations

import faust

from .app import app, settings

history = app.Table(
    "conversation-history",
    default=list,
    schema=faust.Schema(
        key_type=str, value_type=list, key_serializer="raw", value_serializer="json"
    ),
    partitions=settings.partitions,
    help="Conversation id -> list of turns (role, text, timestamp, message_id).",
)
