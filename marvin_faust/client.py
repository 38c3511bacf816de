"""A chat front end's side of the wire: records on the chat topic, via aiokafka.

Used by the CLI commands (``greet``, ``chat``, ``say``). Other producers need none of this code,
only the wire format in ``models``.
"""

from __future__ import annotations

import asyncio
import json
from types import TracebackType

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

from .models import (
    IN_REPLY_TO_HEADER,
    MESSAGE_ID_HEADER,
    ChatMessage,
    header_value,
    make_message,
    new_message_id,
)
from .security import aiokafka_options, credentials_problem
from .settings import Settings

TOPIC_WAIT_SECONDS = 10.0


class ChatClientError(Exception):
    """The broker cannot be reached, or no reply came in time; the message says which."""


class ChatClient:
    """Sends chat records and waits for the replies to them.

    The reply consumer has no group: it is positioned at the end of the reply topic before
    anything is sent, so it sees every reply that follows and no other client's offsets move.
    """

    def __init__(self, settings: Settings, *, listen: bool = True) -> None:
        self.settings = settings
        security = aiokafka_options(settings)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            acks="all",
            enable_idempotence=True,
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
        # With no group, a subscription is assigned every partition of the topic.
        self._consumer.subscribe([topic])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TOPIC_WAIT_SECONDS
        while not (assigned := self._consumer.assignment()):
            if loop.time() > deadline:
                raise ChatClientError(
                    f"topic {topic!r} does not exist: is a marvin-faust worker running?"
                )
            await asyncio.sleep(0.1)
        await self._consumer.seek_to_end(*assigned)
        for tp in assigned:  # fix the positions now, so no reply sent after this is missed
            await self._consumer.position(tp)

    async def send(self, message: ChatMessage) -> str:
        """Send ``message`` keyed by its conversation id; returns its ``uuid`` header."""
        message_id = new_message_id()
        await self._producer.send_and_wait(
            self.settings.topic,
            key=message.conversation_id.encode(),
            value=message.to_bytes(),
            headers=[(MESSAGE_ID_HEADER, message_id.encode())],
        )
        return message_id

    async def greet(self, conversation_id: str | None = None) -> ChatMessage:
        """Open a conversation with the bot's fixed greeting (fresh uuid4 id unless given)."""
        greeting = make_message(
            conversation_id or new_message_id(), self.settings.ai_role, self.settings.greeting
        )
        await self.send(greeting)
        return greeting

    async def ask(self, conversation_id: str, text: str, timeout: float) -> ChatMessage:
        """Send a human message and wait for the AI record that answers it."""
        message_id = await self.send(make_message(conversation_id, self.settings.human_role, text))
        try:
            async with asyncio.timeout(timeout):
                return await self._reply_to(conversation_id, message_id)
        except TimeoutError:
            raise ChatClientError(f"no reply from Marvin within {timeout:g}s") from None

    async def _reply_to(self, conversation_id: str, message_id: str) -> ChatMessage:
        assert self._consumer is not None, "ChatClient(listen=False) cannot wait for replies"
        key = conversation_id.encode()
        async for record in self._consumer:
            if record.key != key or record.value is None:
                continue
            if header_value(record.headers, IN_REPLY_TO_HEADER) not in (None, message_id):
                continue  # a reply to another message of this conversation
            document = json.loads(record.value)
            if document.get("role") == self.settings.ai_role:
                return ChatMessage.from_data(document)
        raise ChatClientError("the reply consumer stopped")
