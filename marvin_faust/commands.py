"""CLI commands beyond Faust's own: ``marvin-faust greet`` and ``marvin-faust broker``."""

from __future__ import annotations

from faust.cli import AppCommand, option

from .app import app, settings
from .client import ChatProducer


@app.command(
    option(
        "--conversation-id",
        default=None,
        help="Use this id instead of a fresh uuid4 (to re-open a conversation).",
    )
)
async def greet(self: AppCommand, conversation_id: str | None) -> None:
    """Open a conversation: send Marvin's greeting and print the new conversation id."""
    async with ChatProducer(settings) as producer:
        cid = await producer.greet(conversation_id)
    self.say(settings.greeting, err=True)
    print(cid)
