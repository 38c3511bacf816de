"""The topics, all read and written as raw bytes.

Raw, because a value that fails to deserialize would crash the agent: the agent validates the
bytes itself (``models.parse_chat_message``) and dead-letters what is bad, original bytes kept.
"""

from __future__ import annotations

from .app import app, settings


def _raw_topic(name: str) -> object:
    return app.topic(
        name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
        # "internal": Faust creates the topic with these partitions before it subscribes, so a
        # fresh cluster works without a manual create step.
        internal=True,
    )


chat_topic = _raw_topic(settings.topic)
reply_topic = (
    chat_topic if settings.replies_to == settings.topic else _raw_topic(settings.replies_to)
)
dead_letter_topic = _raw_topic(settings.dead_letter_topic)
