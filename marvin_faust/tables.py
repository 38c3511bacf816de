"""The conversation history table: RocksDB locally, a compacted changelog topic in Kafka.

Key: the conversation id (the chat topic's key, so the table is co-partitioned with it).
Value: a list of :class:`~marvin_faust.conversation.Turn` dicts, oldest first, bounded by
``MARVIN_MAX_STORED_TURNS``. Always assign a new list: Faust only writes the changelog on
assignment, never on in-place mutation.
"""

from __future__ import annotations

from .app import app, settings

history = app.Table(
    "conversation-history",
    default=list,
    # bytes -> Faust's "raw" key codec: the changelog key is the conversation id's UTF-8 bytes,
    # exactly the chat topic's key, so table_route hashes it to the same partition. (Any other
    # key type gets JSON, a quoted key, and requests get routed to the wrong worker.) The
    # table is still indexed with str ids: the raw codec encodes them.
    key_type=bytes,
    partitions=settings.partitions,
    help="Conversation id -> list of turns (role, text, timestamp, message_id).",
)
