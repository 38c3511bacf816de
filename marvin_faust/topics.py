"""The topics, all read and written as raw bytes.

Raw, because a value that fails to deserialize would crash the agent: the agent validates the
bytes itself (``models.parse_chat_message``) and dead-letters what is bad, original bytes kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faust
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from faust.types import TopicT

from .security import aiokafka_options
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topics:
    chat: TopicT
    replies: TopicT  # the chat topic itself unless MARVIN_REPLY_TOPIC names another
    dead_letters: TopicT
    stream: TopicT | None  # partial replies (marvin_faust.streaming); None = streaming off


def declare_topics(app: faust.App, settings: Settings) -> Topics:
    def raw_topic(name: str, **options: object) -> TopicT:
        return app.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.partitions,
            # "internal": Faust creates the topic with these partitions before it subscribes,
            # so a fresh cluster works without a manual create step.
            internal=True,
            **options,
        )

    chat = raw_topic(settings.topic)
    replies = chat if settings.replies_to == settings.topic else raw_topic(settings.replies_to)
    stream_name = settings.streams_to
    return Topics(
        chat=chat,
        replies=replies,
        dead_letters=raw_topic(settings.dead_letter_topic),
        # Chunks are a live preview: an hour is plenty, and the topic stays small.
        stream=raw_topic(stream_name, retention=settings.stream_retention) if stream_name else None,
    )


async def max_message_bytes(settings: Settings, topic: str) -> int | None:
    """The largest record batch the broker takes on ``topic`` (its ``max.message.bytes``, the
    broker's ``message.max.bytes`` unless the topic sets its own); None when the broker will
    not say (no DescribeConfigs permission, say)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers, **aiokafka_options(settings)
    )
    try:
        await admin.start()
        wanted = ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": None})
        [response] = await admin.describe_configs([wanted])
        [(error_code, error_message, _, _, entries)] = response.resources
        if error_code:
            raise KafkaError(f"error {error_code}: {error_message}")
        return next(int(entry[1]) for entry in entries if entry[0] == "max.message.bytes")
    except (KafkaError, OSError, StopIteration) as exc:
        log.warning("Cannot read max.message.bytes of %s: %r", topic, exc)
        return None
    finally:
        await admin.close()
