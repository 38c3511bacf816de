"""A chat front end's side of the wire: records on the chat topic, via aiokafka.

Used by the CLI commands (``greet``, ``chat``, ``say``) and the web chat (``webchat``). Other
producers need none of this code, only the wire format in ``models``.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from .models import (
    IN_REPLY_TO_HEADER,
    MESSAGE_ID_HEADER,
    BadMessage,
    ChatMessage,
    Forget,
    header_value,
    make_forget,
    make_message,
    new_message_id,
    parse_chat_message,
)
from .partitioners import partitioner_named
from .security import aiokafka_options, credentials_problem
from .settings import Settings
from .streaming import FinishReason, StreamChunk, parse_stream_chunk

TOPIC_WAIT_SECONDS = 10.0
# How soon a stream topic created after the client started is seen (aiokafka's default: 5 min).
METADATA_MAX_AGE_MS = 10_000
# Own message ids remembered to skip their echoes on the reply topic (the greeting is an AI record).
SENT_IDS_KEPT = 1000


# Streams that end with no reply to follow, and what to tell the person.
UNANSWERED = {
    FinishReason.ERROR: "the model failed",
    FinishReason.TIMEOUT: "the model timed out",
}


class ChatClientError(Exception):
    """The broker cannot be reached, or no reply came in time; the message says which."""


@dataclass(frozen=True)
class Reply:
    """An AI record seen on the reply topic, with its ``uuid`` and ``in-reply-to`` headers."""

    message: ChatMessage
    message_id: str | None
    in_reply_to: str | None


class ChatClient:
    """Sends chat records and waits for the replies to them.

    The reply consumer has no group: it takes every partition of the reply topic and is
    positioned at the end before anything is sent, so it sees every reply that follows and no
    other client's offsets move. It reads committed records only: the worker answers inside a
    Kafka transaction (exactly_once), and an aborted attempt must not count as a reply.

    With ``stream=True`` it also reads the stream topic (``MARVIN_STREAM_TOPIC``), whose
    chunks are outside any transaction and so visible at once; a stream topic that does not
    exist yet (no worker has started with streaming) is picked up when it appears.
    """

    def __init__(self, settings: Settings, *, listen: bool = True, stream: bool = False) -> None:
        self.settings = settings
        self.stream_topic = settings.streams_to if listen and stream else None
        self._sent: dict[str, None] = {}  # insertion-ordered set of our own message ids
        security = aiokafka_options(settings)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            # Keys placed as the rest of the fleet places them (MARVIN_PARTITIONER).
            partitioner=partitioner_named(settings.partitioner),
            **security,
        )
        self._consumer = (
            AIOKafkaConsumer(
                bootstrap_servers=settings.bootstrap_servers,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="latest",
                # the worker replies inside Kafka transactions: never show an aborted one
                isolation_level="read_committed",
                metadata_max_age_ms=METADATA_MAX_AGE_MS,
                **security,
            )
            if listen
            else None
        )

    async def __aenter__(self) -> ChatClient:
        try:
            await self._producer.start()
            if self._consumer is not None:
                await self._consumer.start()
                await self._listen_from_end(self.settings.replies_to)
        except (KafkaConnectionError, KafkaTimeoutError) as exc:
            await self.__aexit__(None, None, None)
            # aiokafka reports a rejected login as a failure to connect: say which it was.
            problem = await credentials_problem(self.settings)
            raise ChatClientError(
                problem or f"cannot reach Kafka at {self.settings.bootstrap_servers}: {exc}"
            ) from None
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._producer.stop()
        if self._consumer is not None:
            await self._consumer.stop()

    async def _listen_from_end(self, topic: str) -> None:
        assert self._consumer is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TOPIC_WAIT_SECONDS
        # Check that the topic exists before subscribing: naming a topic in a metadata request
        # would create it with the broker's defaults, not the worker's partition count.
        while topic not in await self._consumer.topics():
            if loop.time() > deadline:
                raise ChatClientError(
                    f"topic {topic!r} does not exist: is a marvin-faust worker running?"
                )
            await asyncio.sleep(0.2)
        # With no group, a subscription is assigned every partition of the topic; a pattern
        # also takes the stream topic once it exists, without creating it.
        names = [topic] if self.stream_topic is None else [topic, self.stream_topic]
        self._consumer.subscribe(pattern="^(" + "|".join(map(re.escape, names)) + ")$")
        while not any(tp.topic == topic for tp in self._consumer.assignment()):
            if loop.time() > deadline:
                raise ChatClientError(f"no partitions of topic {topic!r} could be assigned")
            await asyncio.sleep(0.1)
        for tp in self._consumer.assignment():  # fix the positions now: nothing later is missed
            await self._consumer.position(tp)

    async def send(self, message: ChatMessage) -> str:
        """Send ``message`` keyed by its conversation id; returns its ``uuid`` header."""
        message_id = new_message_id()
        self._sent[message_id] = None
        while len(self._sent) > SENT_IDS_KEPT:
            del self._sent[next(iter(self._sent))]
        try:
            await self._producer.send_and_wait(
                self.settings.topic,
                key=message.conversation_id.encode(),
                value=message.to_bytes(),
                headers=[(MESSAGE_ID_HEADER, message_id.encode())],
            )
        except KafkaError as exc:
            raise ChatClientError(f"cannot send to {self.settings.topic!r}: {exc}") from None
        return message_id

    async def chat_partitions(self) -> list[int]:
        """The chat topic's partitions; fails when the topic does not exist."""
        topic = self.settings.topic
        try:
            # All the metadata, not the topic's: naming a missing topic would create it.
            metadata = await self._producer.client.fetch_all_metadata()
        except KafkaError as exc:
            raise ChatClientError(f"cannot read the metadata of {topic!r}: {exc}") from None
        partitions = metadata.partitions_for_topic(topic)
        if not partitions:
            raise ChatClientError(
                f"topic {topic!r} does not exist: is a marvin-faust worker running?"
            )
        return sorted(partitions)

    async def forget(self, conversation_id: str) -> None:
        """Ask for a conversation's history to be deleted: a forget record on every partition
        of the chat topic, so that whichever partitioner its front ends used, each part of it
        is deleted, in order with its messages there. Returns once Kafka has every record."""
        await self.send_forgets(await self.forget_records(conversation_id))

    async def forget_records(self, conversation_id: str) -> list[tuple[Forget, int, str]]:
        """The forget records of a conversation, ``(record, partition, uuid header)``, one
        for each partition of the chat topic."""
        forget = make_forget(conversation_id)
        return [(forget, partition, new_message_id()) for partition in await self.chat_partitions()]

    async def send_forgets(self, forgets: Sequence[tuple[Forget, int, str]]) -> None:
        """Send forget records, ``(record, partition, uuid header)``, all at once; returns
        once Kafka has every one."""
        try:
            deliveries = [
                await self._producer.send(
                    self.settings.topic,
                    key=forget.conversation_id.encode(),
                    value=forget.to_bytes(),
                    headers=Forget.headers(message_id),
                    partition=partition,
                )
                for forget, partition, message_id in forgets
            ]
            await asyncio.gather(*deliveries)
        except KafkaError as exc:
            raise ChatClientError(f"cannot send to {self.settings.topic!r}: {exc}") from None

    async def greet(self, conversation_id: str | None = None) -> ChatMessage:
        """Open a conversation with the bot's fixed greeting (fresh uuid4 id unless given)."""
        greeting = make_message(
            conversation_id or new_message_id(), self.settings.ai_role, self.settings.greeting
        )
        await self.send(greeting)
        return greeting

    async def post(self, conversation_id: str, text: str) -> tuple[ChatMessage, str]:
        """Send a human message without waiting; returns it and its ``uuid`` header."""
        message = make_message(conversation_id, self.settings.human_role, text)
        return message, await self.send(message)

    async def ask(
        self,
        conversation_id: str,
        text: str,
        timeout: float,
        on_chunk: Callable[[StreamChunk], None] | None = None,
    ) -> ChatMessage:
        """Send a human message and wait for the AI record that answers it; meanwhile pass
        every stream chunk of that answer to ``on_chunk`` (with ``stream=True``). A stream
        that ends in ``error`` or ``timeout`` means no reply will come: that raises at once."""
        message, message_id = await self.post(conversation_id, text)
        try:
            async with asyncio.timeout(timeout):
                async for event in self.events():
                    if isinstance(event, StreamChunk):
                        if event.in_reply_to != message_id:
                            continue
                        if on_chunk is not None:
                            on_chunk(event)
                        if event.done and event.finish_reason in UNANSWERED:
                            raise ChatClientError(
                                f"Marvin could not answer ({UNANSWERED[event.finish_reason]}); "
                                "the message went to the dead-letter topic"
                            )
                    elif answers(event, message, message_id):
                        return event.message
        except TimeoutError:
            raise ChatClientError(f"no reply from Marvin within {timeout:g}s") from None
        raise ChatClientError("the reply consumer stopped")

    async def events(self) -> AsyncIterator[Reply | StreamChunk]:
        """Every AI record on the reply topic from the listening position on, except our own
        (the greetings this client sent), and with ``stream=True`` the stream chunks between
        them, in the order they arrive. Records that are neither are skipped."""
        assert self._consumer is not None, "ChatClient(listen=False) cannot wait for replies"
        async for record in self._consumer:
            if record.topic == self.stream_topic:
                try:
                    chunk = parse_stream_chunk(record.value)
                except BadMessage:
                    continue
                yield chunk
                continue
            try:
                message = parse_chat_message(record.value, max_text_chars=sys.maxsize)
            except BadMessage:
                continue
            message_id = header_value(record.headers, MESSAGE_ID_HEADER)
            if message.role != self.settings.ai_role or message_id in self._sent:
                continue
            if record.key != message.conversation_id.encode():
                continue
            yield Reply(message, message_id, header_value(record.headers, IN_REPLY_TO_HEADER))


def answers(reply: Reply, message: ChatMessage, message_id: str) -> bool:
    """Whether ``reply`` answers ``message`` (sent with ``uuid`` header ``message_id``).

    The worker names the message it answers in ``in-reply-to``. A bot that sets no such header
    is taken at its word for a reply in the same conversation sent after the message.
    """
    if reply.message.conversation_id != message.conversation_id:
        return False
    if reply.in_reply_to is not None:
        return reply.in_reply_to == message_id
    return reply.message.Timestamp >= message.Timestamp
