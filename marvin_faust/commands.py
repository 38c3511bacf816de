"""CLI commands beyond Faust's own: ``greet``, ``chat``, ``say``, ``webchat`` (front ends over
Kafka) and ``broker`` (the local development broker)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

import click
import faust
from faust.cli import AppCommand, argument, option
from faust.cli.faust import cli as faust_cli

from . import broker
from .client import ChatClient, ChatClientError
from .webchat import serve as serve_webchat

REPLY_TIMEOUT = 300.0
QUIT = "/quit"


_COMMANDS: list[tuple[Any, tuple]] = []


def command(*options: Any) -> Any:
    """Like ``app.command``, for :func:`declare_commands` to register on the app it builds."""

    def collect(fun: Any) -> Any:
        _COMMANDS.append((fun, options))
        return fun

    return collect


def declare_commands(app: faust.App) -> None:
    """``greet``, ``chat``, ``say``, ``webchat`` on ``app``; ``broker`` on Faust's CLI."""
    for fun, options in _COMMANDS:
        app.command(*options)(fun)
    if "broker" not in faust_cli.commands:
        faust_cli.add_command(broker.cli, "broker")


def fail(message: str) -> None:
    """One clear line on stderr and a non-zero exit."""
    click.echo(f"marvin-faust: {message}", err=True)
    raise SystemExit(1)


def quiet_kafka_logs() -> None:
    """aiokafka logs every failed connection attempt; a front end reports failures in one line."""
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


@contextlib.asynccontextmanager
async def spinner(label: str) -> AsyncIterator[None]:
    """A spinner on stderr while waiting, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield
        return

    async def spin() -> None:
        for frame in itertools.cycle("|/-\\"):
            sys.stderr.write(f"\r{frame} {label}")
            sys.stderr.flush()
            await asyncio.sleep(0.1)

    task = asyncio.create_task(spin())
    try:
        yield
    finally:
        task.cancel()
        sys.stderr.write("\r" + " " * (len(label) + 2) + "\r")
        sys.stderr.flush()


@command(
    option(
        "--conversation-id",
        default=None,
        help="Use this id instead of a fresh uuid4 (to re-open a conversation).",
    )
)
async def greet(self: AppCommand, conversation_id: str | None) -> None:
    """Open a conversation: send Marvin's greeting and print the new conversation id."""
    quiet_kafka_logs()
    try:
        async with ChatClient(self.app.settings, listen=False) as client:
            greeting = await client.greet(conversation_id)
    except ChatClientError as exc:
        fail(str(exc))
    click.echo(greeting.text, err=True)
    click.echo(greeting.conversation_id)


@command(
    argument("conversation_id", required=False),
    option(
        "--timeout",
        type=float,
        default=REPLY_TIMEOUT,
        show_default=True,
        help="Seconds to wait for each reply.",
    ),
)
async def chat(self: AppCommand, conversation_id: str | None, timeout: float) -> None:
    """Chat with Marvin in the terminal (a new conversation, or resume one by id).

    Type a line and press Enter; /quit or Ctrl-D ends the chat.
    """
    quiet_kafka_logs()
    try:
        async with ChatClient(self.app.settings) as client:
            if conversation_id is None:
                greeting = await client.greet()
                conversation_id = greeting.conversation_id
                click.echo(f"[conversation {conversation_id}]")
                click.echo(f"Marvin: {greeting.text}")
            else:
                click.echo(f"[resuming conversation {conversation_id}]")
            while True:
                line = await asyncio.to_thread(read_line, "You: ")
                if line is None or line.strip() == QUIT:
                    break
                if not line.strip():
                    continue
                async with spinner("Marvin is thinking..."):
                    reply = await client.ask(conversation_id, line, timeout)
                click.echo(f"Marvin: {reply.text}")
    except ChatClientError as exc:
        fail(str(exc))


def read_line(prompt: str) -> str | None:
    """One line from stdin, or None at end of input."""
    try:
        return input(prompt)
    except EOFError:
        return None


@command(
    argument("conversation_id"),
    argument("text"),
    option(
        "--timeout",
        type=float,
        default=REPLY_TIMEOUT,
        show_default=True,
        help="Seconds to wait for the reply.",
    ),
    option("--json", "as_json", is_flag=True, help="Print the reply record as JSON."),
)
async def say(
    self: AppCommand, conversation_id: str, text: str, timeout: float, as_json: bool
) -> None:
    """Send one message to a conversation and print Marvin's reply (for scripts)."""
    quiet_kafka_logs()
    try:
        async with ChatClient(self.app.settings) as client:
            reply = await client.ask(conversation_id, text, timeout)
    except ChatClientError as exc:
        fail(str(exc))
    click.echo(json.dumps(reply.asdict(), ensure_ascii=False) if as_json else reply.text)


@command(
    option(
        "--port",
        type=int,
        default=None,
        help="Port to listen on  [default: $MARVIN_WEBCHAT_PORT, else 8080]",
    ),
    option(
        "--bind",
        default=None,
        help="Address to bind to  [default: $MARVIN_WEBCHAT_BIND, else 127.0.0.1]",
    ),
)
async def webchat(self: AppCommand, port: int | None, bind: str | None) -> None:
    """Serve the web chat page: a front end of its own that reaches Marvin only through Kafka."""
    quiet_kafka_logs()
    try:
        settings = self.app.settings
        await serve_webchat(settings, bind or settings.webchat_bind, port or settings.webchat_port)
    except ChatClientError as exc:
        fail(str(exc))
    except OSError as exc:  # e.g. the port is taken
        fail(f"cannot serve the web chat: {exc}")
