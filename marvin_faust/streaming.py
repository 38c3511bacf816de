"""Partial replies on a stream topic while the model writes them.

Wire format of one chunk on ``MARVIN_STREAM_TOPIC`` (key = the conversation id, on the partition
of the human message it answers)::

    {"conversation_id": "...", "in_reply_to": "<the human message's uuid header>",
     "stream_id": "<the uuid header the final reply will carry>", "index": 0,
     "delta": "text since the previous chunk", "done": false}

The last chunk of a stream has ``"done": true`` and a ``"finish_reason"``: ``stop``, ``length``,
``error`` or ``timeout``. Headers, as LangStream's stream-to-topic writes them: ``stream-id``,
``stream-index``, ``stream-last-message`` (``true``/``false``).

Chunks are a preview, never the record of truth: the final reply on the chat topic is. They go
through a plain idempotent producer of their own, outside the worker's Kafka transaction (inside
it they would stay invisible to ``read_committed`` readers until the commit, that is until the
reply itself). A message redelivered after a crash streams again under a new ``stream_id``: a
front end keys partial text by ``in_reply_to`` and restarts it.

Pacing (:class:`ChunkPacer`): the first token goes out at once; after that a chunk at most every
``MARVIN_STREAM_INTERVAL`` seconds or every :data:`CHUNK_TOKENS` tokens, whichever comes first,
so Kafka is not flooded with one-token records.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaProducer
from mode import Service

from .models import BadMessage
from .partitioners import partitioner_named
from .security import aiokafka_options

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger(__name__)

CHUNK_TOKENS = 16  # a chunk goes out when this many tokens wait, whatever the interval

STREAM_ID_HEADER = "stream-id"
STREAM_INDEX_HEADER = "stream-index"
STREAM_LAST_HEADER = "stream-last-message"


class FinishReason(StrEnum):
    STOP = "stop"  # the model ended its turn
    LENGTH = "length"  # MARVIN_MAX_TOKENS reached
    ERROR = "error"  # the model failed: the message is dead-lettered, no reply follows
    TIMEOUT = "timeout"  # MARVIN_MODEL_TIMEOUT passed: dead-lettered, no reply follows


@dataclass(frozen=True)
class StreamChunk:
    conversation_id: str
    in_reply_to: str | None
    stream_id: str
    index: int
    delta: str
    done: bool
    finish_reason: FinishReason | None = None

    def to_bytes(self) -> bytes:
        document: dict[str, Any] = asdict(self)
        if not self.done:
            del document["finish_reason"]
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            (STREAM_ID_HEADER, self.stream_id.encode()),
            (STREAM_INDEX_HEADER, str(self.index).encode()),
            (STREAM_LAST_HEADER, b"true" if self.done else b"false"),
        ]


def parse_stream_chunk(value: bytes | None) -> StreamChunk:
    """One stream record's value, or :class:`BadMessage` saying what is wrong with it."""
    try:
        document = json.loads(value or b"")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadMessage(f"stream chunk is not UTF-8 JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BadMessage("stream chunk is not a JSON object")
    expected: dict[str, type | tuple[type, ...]] = {
        "conversation_id": str,
        "in_reply_to": (str, type(None)),
        "stream_id": str,
        "index": int,
        "delta": str,
        "done": bool,
    }
    for field, kind in expected.items():
        if not isinstance(document.get(field, ...), kind):
            raise BadMessage(f"stream chunk field {field!r} is missing or mistyped")
    reason = document.get("finish_reason")
    try:
        finish_reason = FinishReason(reason) if document["done"] else None
    except ValueError:
        raise BadMessage(f"stream chunk has an unknown finish_reason {reason!r}") from None
    fields = {field: document[field] for field in expected}
    return StreamChunk(**fields, finish_reason=finish_reason)


# C0 and C1 control characters but newline and tab: ESC starts terminal escape sequences, and
# the rest move the cursor, ring bells or clear lines.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` without control characters: model output shown in a terminal stays text."""
    return _CONTROL.sub("", text)


class ChunkPacer:
    """When buffered tokens go out as one chunk (pure: the caller passes the clock).

    The first token is due at once; after that the buffer is due :attr:`interval` seconds after
    the previous chunk went out, or as soon as it holds :attr:`max_tokens` tokens.
    """

    def __init__(self, interval: float, max_tokens: int = CHUNK_TOKENS) -> None:
        self.interval = interval
        self.max_tokens = max_tokens
        self._pieces: list[str] = []
        self._last_sent: float | None = None

    def offer(self, delta: str, now: float) -> str | None:
        """Buffer ``delta``; the text to send now, if the buffer is due."""
        self._pieces.append(delta)
        deadline = self.deadline
        if len(self._pieces) >= self.max_tokens or (deadline is not None and now >= deadline):
            return self.take(now)
        return None

    @property
    def deadline(self) -> float | None:
        """When the buffered text is due (None: nothing buffered)."""
        if not self._pieces:
            return None
        return self._last_sent + self.interval if self._last_sent is not None else float("-inf")

    def take(self, now: float) -> str:
        """Everything buffered, as one delta; the interval restarts at ``now``."""
        text = "".join(self._pieces)
        self._pieces.clear()
        self._last_sent = now
        return text


SendChunk = Callable[[StreamChunk], Awaitable[None]]


class ReplyStream:
    """The chunks of one reply: :meth:`push` each token (on the event loop), then
    :meth:`finish` once with the reason; chunks go out paced, in order, one task per stream.

    Sending is best effort: a chunk that cannot be sent is logged and skipped, and the reply,
    the record of truth, goes on regardless.
    """

    _END = object()

    def __init__(
        self,
        send: SendChunk,
        *,
        conversation_id: str,
        in_reply_to: str | None,
        stream_id: str,
        interval: float,
    ) -> None:
        self._send = send
        self.conversation_id = conversation_id
        self.in_reply_to = in_reply_to
        self.stream_id = stream_id
        self._pacer = ChunkPacer(interval)
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._open = True  # takes pieces until finished or abandoned
        self._reason: FinishReason | None = None
        self._index = 0
        self._task = asyncio.create_task(self._relay(), name=f"stream-{stream_id}")

    def push(self, delta: str) -> None:
        if delta and self._open:
            self._queue.put_nowait(delta)

    async def finish(self, reason: FinishReason) -> None:
        """Send what is buffered as the last chunk (``done``, ``reason``); idempotent."""
        if self._open:
            self._open = False
            self._reason = reason
            self._queue.put_nowait(self._END)
        await asyncio.shield(self._task)

    def abandon(self) -> None:
        """Stop sending, without a last chunk: the message will be streamed again."""
        self._open = False
        self._task.cancel()

    async def _relay(self) -> None:
        loop = asyncio.get_running_loop()
        pacer = self._pacer
        while True:
            deadline = pacer.deadline
            try:
                if deadline is None:
                    item = await self._queue.get()
                else:
                    item = await asyncio.wait_for(
                        self._queue.get(), max(0.0, deadline - loop.time())
                    )
            except TimeoutError:
                await self._emit(pacer.take(loop.time()), done=False)
                continue
            if item is self._END:
                await self._emit(pacer.take(loop.time()), done=True)
                return
            text = pacer.offer(item, loop.time())
            if text is not None:
                await self._emit(text, done=False)

    async def _emit(self, delta: str, *, done: bool) -> None:
        chunk = StreamChunk(
            conversation_id=self.conversation_id,
            in_reply_to=self.in_reply_to,
            stream_id=self.stream_id,
            index=self._index,
            delta=delta,
            done=done,
            finish_reason=self._reason if done else None,
        )
        self._index += 1
        try:
            await self._send(chunk)
        except Exception as exc:  # a preview: never let it cost the reply
            log.warning("Stream chunk %d of %s not sent: %s", chunk.index, self.stream_id, exc)


class StreamPublisher(Service):
    """The stream topic's own idempotent producer, outside the worker's transactions.

    A dependency of the app: started with the worker, stopped after its agent. The topic itself
    is declared by the agent (``Answerer.prepare``) with Faust's topic declaration, so it gets
    the chat topic's partition count and ``MARVIN_STREAM_RETENTION``.
    """

    def __init__(self, settings: Settings, topic: str, **kwargs: Any) -> None:
        self.settings = settings
        self.topic = topic
        self._producer: AIOKafkaProducer | None = None
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            # A chunk is worth sending the moment it is due: the pacer batches already.
            linger_ms=0,
            partitioner=partitioner_named(self.settings.partitioner),
            **aiokafka_options(self.settings),
        )
        await self._producer.start()

    async def on_stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    def open(
        self,
        conversation_id: str,
        *,
        in_reply_to: str | None,
        stream_id: str,
        partition: int | None,
    ) -> ReplyStream:
        """The stream of one reply, on ``partition`` (None: placed by the key)."""
        key = conversation_id.encode()

        async def send(chunk: StreamChunk) -> None:
            if self._producer is None:
                raise RuntimeError("the stream producer is not started")
            delivery = await self._producer.send(
                self.topic,
                key=key,
                value=chunk.to_bytes(),
                headers=chunk.headers(),
                partition=partition,
            )
            delivery.add_done_callback(_log_failed_delivery)

        return ReplyStream(
            send,
            conversation_id=conversation_id,
            in_reply_to=in_reply_to,
            stream_id=stream_id,
            interval=self.settings.stream_interval,
        )


def _log_failed_delivery(delivery: asyncio.Future) -> None:
    if not delivery.cancelled() and delivery.exception() is not None:
        log.warning("A stream chunk was not delivered: %s", delivery.exception())
