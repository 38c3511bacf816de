"""CLI commands beyond Faust's own: ``greet``, ``chat``, ``say``, ``forget``, ``webchat`` (front
ends over Kafka) and ``broker`` (the local development broker)."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TextIO

import click
import faust
from faust.cli import AppCommand, argument, option
from faust.cli.faust import cli as faust_cli

from . import broker
from .client import ChatClient, ChatClientError
from .models import conversation_id_problem
from .streaming import StreamChunk, printable
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
    """``greet``, ``chat``, ``say``, ``forget``, ``webchat`` on ``app``; ``broker`` on Faust's
    CLI."""
    for fun, options in _COMMANDS:
        app.command(*options)(fun)
    if "broker" not in faust_cli.commands:
        faust_cli.add_command(broker.cli, "broker")


def fail(message: str) -> None:
    """One clear line on stderr and a non-zero exit."""
    click.echo(f"marvin-faust: {message}", err=True)
    raise SystemExit(1)


def check_conversation_id(conversation_id: str | None) -> None:
    """Stop with one line when a conversation id given on the command line is not valid."""
    if conversation_id is not None:
        problem = conversation_id_problem(conversation_id)
        if problem is not None:
            fail(f"invalid conversation id: {problem}")


def quiet_kafka_logs() -> None:
    """aiokafka logs every failed connection attempt; a front end reports failures in one line."""
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


class Spinner:
    """A spinner on stderr while waiting, only when stderr is a terminal; :meth:`stop` is
    idempotent, so the first streamed token can end it."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Spinner:
        if sys.stderr.isatty():
            self._task = asyncio.create_task(self._spin())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.stop()

    async def _spin(self) -> None:
        for frame in itertools.cycle("|/-\\"):
            sys.stderr.write(f"\r{frame} {self.label}")
            sys.stderr.flush()
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
            sys.stderr.write("\r" + " " * (len(self.label) + 2) + "\r")
            sys.stderr.flush()


class LiveReply:
    """One reply in a terminal as it streams: ``prefix`` and the text as it comes, a restarted
    stream (a worker crashed mid-reply) as such, then the final reply, the record of truth, in
    full only where it differs from what was shown. Model text is printed with no control
    characters (no escape sequences reach the terminal)."""

    def __init__(
        self, prefix: str, out: TextIO, on_first: Callable[[], None] | None = None
    ) -> None:
        self.prefix = prefix
        self.out = out
        self.on_first = on_first
        self.stream_id: str | None = None
        self.shown = ""

    def chunk(self, chunk: StreamChunk) -> None:
        if chunk.stream_id != self.stream_id:
            if self.stream_id is None and self.on_first is not None:
                self.on_first()
            if self.stream_id is not None:
                self._write("\n[the reply restarted]\n")
            self.stream_id, self.shown = chunk.stream_id, ""
            self._write(self.prefix)
        text = printable(chunk.delta)
        if not self.shown:
            text = text.lstrip()  # the final reply is stripped too
        self.shown += text
        self._write(text)

    def final(self, text: str) -> None:
        text = printable(text)
        if self.stream_id is None:
            self._write(f"{self.prefix}{text}\n")
        elif self.shown.rstrip() == text:
            self._write("\n")
        else:
            self._write(f"\n{self.prefix}{text}\n")

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


@command(
    option(
        "--conversation-id",
        default=None,
        help="Use this id instead of a fresh uuid4 (to re-open a conversation).",
    )
)
async def greet(self: AppCommand, conversation_id: str | None) -> None:
    """Open a conversation: send Marvin's greeting and print the new conversation id."""
    check_conversation_id(conversation_id)
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
    check_conversation_id(conversation_id)
    quiet_kafka_logs()
    try:
        async with ChatClient(self.app.settings, stream=True) as client:
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
                async with Spinner("Marvin is thinking...") as spinner:
                    live = LiveReply("Marvin: ", sys.stdout, on_first=spinner.stop)
                    reply = await client.ask(conversation_id, line, timeout, on_chunk=live.chunk)
                live.final(reply.text)
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
    option("--stream", is_flag=True, help="Print the reply as it is written, token by token."),
)
async def say(
    self: AppCommand,
    conversation_id: str,
    text: str,
    timeout: float,
    as_json: bool,
    stream: bool,
) -> None:
    """Send one message to a conversation and print Marvin's reply (for scripts)."""
    if as_json and stream:
        fail("--json and --stream exclude each other: a record is printed whole")
    check_conversation_id(conversation_id)
    quiet_kafka_logs()
    live = LiveReply("", sys.stdout)
    try:
        async with ChatClient(self.app.settings, stream=stream) as client:
            reply = await client.ask(conversation_id, text, timeout, on_chunk=live.chunk)
    except ChatClientError as exc:
        if live.stream_id is not None:
            sys.stdout.write("\n")
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(reply.asdict(), ensure_ascii=False))
    else:
        live.final(reply.text)


@command(argument("conversation_id"))
async def forget(self: AppCommand, conversation_id: str) -> None:
    """Delete a conversation's stored history, wherever it is stored.

    Sends a forget record to every partition of the chat topic; the workers delete the history
    in order with the conversation's messages. A later message starts a fresh conversation.
    Forgetting an unknown or already forgotten conversation changes nothing.
    """
    check_conversation_id(conversation_id)
    quiet_kafka_logs()
    try:
        async with ChatClient(self.app.settings, listen=False) as client:
            await client.forget(conversation_id)
    except ChatClientError as exc:
        fail(str(exc))
    click.echo(f"forget {conversation_id}: sent; the workers delete it in order")


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
    # --port and --bind are in the settings already (app.cli_overrides), checked there: a
    # non-loopback address without MARVIN_API_TOKEN stops the start.
    settings = self.app.settings
    try:
        await serve_webchat(settings, settings.webchat_bind, settings.webchat_port)
    except ChatClientError as exc:
        fail(str(exc))
    except OSError as exc:  # e.g. the port is taken
        fail(f"cannot serve the web chat: {exc}")
