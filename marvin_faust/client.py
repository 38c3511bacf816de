"""Talking to the agent the way any front end does: records on the chat topic, via aiokafka.

Used by the CLI commands; other producers need none of this code, only the wire format.
"""

from __future__ import annotations

from types import TracebackType

from aiokafka import AIOKafkaProducer

from .models import MESSAGE_ID_HEADER, ChatMessage, make_message, new_message_id
from .settings import Settings


class ChatProducer:
    """Produces chat records keyed by conversation id, each with a fresh ``uuid`` header."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers, acks="all", enable_idempotence=True
        )

    async def __aenter__(self) -> ChatProducer:
        await self._producer.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._producer.stop()

    async def send(self, message: ChatMessage) -> str:
        """Send ``message``; returns its per-message id (the ``uuid`` header)."""
        message_id = new_message_id()
        await self._producer.send_and_wait(
            self.settings.topic,
            key=message.conversation_id.encode(),
            value=message.to_bytes(),
            headers=[(MESSAGE_ID_HEADER, message_id.encode())],
        )
        return message_id

    async def greet(self, conversation_id: str | None = None) -> str:
        """Open a conversation with the bot's fixed greeting; returns the conversation id."""
        cid = conversation_id or new_message_id()
        await self.send(make_message(cid, self.settings.ai_role, self.settings.greeting))
        return cid

    async def say(self, conversation_id: str, text: str) -> str:
        return await self.send(make_message(conversation_id, self.settings.human_role, text))
