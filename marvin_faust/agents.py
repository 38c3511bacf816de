"""The Marvin agent: answer each human message on ``chat`` in the Marvin persona.

Per message, in order:

1. validate the raw bytes (bad -> dead-letter topic with the original bytes and the reason);
2. drop the bot's own messages, except an opening greeting, stored as the first AI turn;
3. skip a message already in the history (a redelivery): by its ``uuid`` header, or where it
   has none by its place in the log (``topic/partition@offset``);
4. trim the history to the token budget, build the prompt, ask the model in a worker thread,
   streaming its text to the stream topic as it comes (``marvin_faust.streaming``, outside the
   transaction: a preview, ended with a finish reason whatever happens);
5. send the reply, same key, to the partition the message came from, and assign the new
   history (human turn + AI turn): under exactly_once both commit with the message's offset in
   one transaction; under at_least_once the reply is delivered before the history that marks
   the message answered is written.

A forget record (header ``marvin-control: forget``, ``models.Forget``) deletes the
conversation's history instead, in the same transaction as its offset; an expiry only if the
conversation's newest turn is still the one the sweep saw (``marvin_faust.lifecycle``).

:class:`Answerer` holds the agent's body with every dependency explicit; :func:`declare_agent`
registers it on an app. Up to ``backend.parallel`` messages are answered at once, one
conversation's strictly in order (``scheduling.run_keyed``); each event is acknowledged when it
is done, and Faust commits an offset only once every offset before it on its partition is.
Every failure is caught per message and dead-lettered, so nothing is acked silently and the
agent keeps running; a message that cannot even be dead-lettered (``DeadLetterFailed``) stops the
worker with that message unacknowledged, to be read again by the next one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from faust.types import AgentT, EventT

from .activity import last_activity
from .conversation import (
    append_turns,
    build_prompt,
    has_message,
    history_window,
    make_turn,
)
from .dead_letters import (
    DeadLetter,
    dead_letter,
    record_size,
    reduced_dead_letter,
    too_large,
)
from .llm import Generation, ModelError, ModelTimeout
from .models import (
    CONTROL_HEADER,
    FORGET,
    IN_REPLY_TO_HEADER,
    MESSAGE_ID_HEADER,
    BadMessage,
    ChatMessage,
    ForgetReason,
    header_pairs,
    header_value,
    make_message,
    new_message_id,
    parse_chat_message,
    parse_forget,
)
from .scheduling import run_keyed
from .streaming import FinishReason, ReplyStream
from .topics import max_message_bytes

if TYPE_CHECKING:
    from .app import MarvinApp

log = logging.getLogger(__name__)

EMPTY_REPLY = "*sigh*"  # what Marvin says when the model produced nothing


class DeadLetterFailed(Exception):
    """A record could be neither answered nor dead-lettered: it must not be acknowledged."""


class Outcome(StrEnum):
    ANSWERED = "answered"
    DEAD_LETTERED = "dead-lettered"
    DROPPED = "dropped"  # the bot's own message
    GREETING = "greeting"
    DUPLICATE = "duplicate"
    FORGOTTEN = "forgotten"  # deleted on request
    EXPIRED = "expired"  # deleted for being idle
    KEPT = "kept"  # an expiry that found the conversation active again
    ABSENT = "absent"  # a deletion of a conversation not stored here


def declare_agent(app: MarvinApp) -> AgentT:
    """The ``answer`` agent on the chat topic of ``app``."""
    answerer = Answerer(app)

    async def answer(stream: Any) -> AsyncIterator[Outcome]:
        # Faust may start the agent before the model has loaded: let the stream buffer.
        await app.backend.wait_until_loaded()
        await answerer.prepare()
        # Yielding the outcome lets agent.test_context() wait until a message is handled.
        try:
            async for outcome in run_keyed(
                stream.noack().events(),
                key=lambda event: event.message.key,  # one conversation's messages in order
                handle=answerer.handle_event,
                # MARVIN_PARALLEL, where the backend can generate that many replies at once.
                limit=app.backend.parallel,
            ):
                yield outcome
        except Exception as exc:
            # A message neither answered nor dead-lettered (DeadLetterFailed, or a bug) is
            # left unacknowledged, and commits stop below it. Faust would restart the agent
            # past it and the worker would run on with its commits stuck: stop the worker
            # instead; the next one reads the message again.
            log.critical("Stopping the worker: a message was neither answered nor dead-lettered")
            await app.crash(exc)

    agent = app.agent(app.chat_topics.chat, name=f"{__name__}.answer")(answer)
    agent.answerer = answerer  # type: ignore[attr-defined]  # for tests
    return agent


class Answerer:
    """Handles one chat record: validate, answer or dead-letter, store the history."""

    def __init__(self, app: MarvinApp) -> None:
        self.app = app
        self.settings = app.settings
        self.backend = app.backend
        self.topics = app.chat_topics
        self.history = app.history
        self.metrics = app.metrics
        self.barrier = app.commit_barrier
        self.streams = app.stream_publisher
        self.lifecycle = app.lifecycle
        # Whether replies and stream chunks go to their message's partition (see prepare).
        self.replies_on_source = True
        self.stream_on_source = True
        # The largest dead letter sent whole (see prepare): Faust's producer refuses more.
        self.dead_letter_limit: int = app.conf.producer_max_request_size

    async def prepare(self) -> None:
        """Declare the topics the agent writes, and decide where replies and chunks go: to
        their message's partition when their topic is the chat topic or has as many
        partitions. Then a conversation stays on one partition, in order, whichever
        partitioner its front end used; otherwise they are keyed with ``MARVIN_PARTITIONER``.

        Also learn the largest record the dead-letter topic takes. A dead letter the broker
        refuses under exactly_once leaves the transactional producer's sequence for that
        partition with a gap (aiokafka keeps no abortable state), so even its reduced form
        fails then (``OutOfOrderSequenceNumber``): a dead letter over the limit is sent
        reduced at once instead."""
        # Dead letters are rare: the first would otherwise create its topic with the broker's
        # defaults, where the broker creates topics at all.
        dead_letters = self.topics.dead_letters
        await dead_letters.maybe_declare()
        topic_limit = await max_message_bytes(self.settings, dead_letters.get_topic_name())
        if topic_limit is not None:
            self.dead_letter_limit = min(self.dead_letter_limit, topic_limit)
        if self.topics.replies is not self.topics.chat:
            self.replies_on_source = await self._partitions_match(self.topics.replies)
        if self.topics.stream is not None:
            self.stream_on_source = await self._partitions_match(self.topics.stream)

    async def _partitions_match(self, topic: Any) -> bool:
        # Asking for a missing topic's partitions would create it with the broker's defaults,
        # and the agent can get here before Faust has declared its topics.
        for declared in (self.topics.chat, topic):
            await declared.maybe_declare()
        producer = self.app.producer._ensure_producer()  # Faust offers no public call for this
        chat, other = [
            await producer.partitions_for(declared.get_topic_name())
            for declared in (self.topics.chat, topic)
        ]
        return len(chat) == len(other)

    async def handle_event(self, event: EventT) -> Outcome:
        """Handle one event of the chat topic, then acknowledge it."""
        message = event.message
        outcome = await self.handle(
            message.key,
            message.value,
            message.headers,
            source=_source(message),
            partition=message.partition,
        )
        self.metrics.messages.labels(outcome=outcome.value).inc()
        event.ack()
        return outcome

    async def handle(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: Any,
        *,
        source: str,
        partition: int | None = None,
    ) -> Outcome:
        """Answer, store or dead-letter one record read from ``partition`` of the chat topic."""
        settings = self.settings
        try:
            control = header_value(headers, CONTROL_HEADER)
            if control is not None:
                return await self.forget(key, value, control, headers, partition)
            chat = parse_chat_message(value, max_text_chars=settings.max_text_chars)
            if key is None or key.decode("utf-8", errors="replace") != chat.conversation_id:
                raise BadMessage("the record key must be the conversation_id")
            if chat.role == settings.ai_role:
                return await self.record_greeting(
                    chat, header_value(headers, MESSAGE_ID_HEADER), partition
                )
            if chat.role != settings.human_role:
                raise BadMessage(f"unknown role {chat.role!r}")
            return await self.reply_to(
                chat, header_value(headers, MESSAGE_ID_HEADER), partition, source
            )
        except BadMessage as exc:
            cause, reason = "bad-message", f"bad message: {exc}"
        except ModelError as exc:
            cause, reason = "model", f"model failed: {exc}"
        except Exception as exc:  # anything else must not lose the message either
            log.exception("Unexpected failure on %s", source)
            cause, reason = "internal", f"internal error: {type(exc).__name__}: {exc}"
        await self.dead_letter(key, value, headers, reason, source)
        self.metrics.dead_letters.labels(cause=cause).inc()
        return Outcome.DEAD_LETTERED

    async def record_greeting(
        self, chat: ChatMessage, message_id: str | None, partition: int | None
    ) -> Outcome:
        """Store the bot's opening line; every other AI message is the bot's own reply."""
        if self.history[chat.conversation_id]:
            return Outcome.DROPPED
        stored = [make_turn(chat.role, chat.text, chat.Timestamp, message_id)]
        async with self.barrier.writes_of_one_event():
            self.history[chat.conversation_id] = stored
        self.lifecycle.written(partition, chat.conversation_id, stored)
        return Outcome.GREETING

    async def forget(
        self,
        key: bytes | None,
        value: bytes | None,
        control: str,
        headers: Any,
        partition: int | None,
    ) -> Outcome:
        """Delete a conversation's history: a tombstone in the changelog, committed with the
        record's offset. An expiry deletes only if the newest turn is the one the sweep saw."""
        try:
            if control != FORGET:
                raise BadMessage(f"unknown {CONTROL_HEADER} {control!r}")
            forget = parse_forget(value)
            cid = forget.conversation_id
            if key is None or key.decode("utf-8", errors="replace") != cid:
                raise BadMessage("the record key must be the conversation_id")
            past = self.history[cid]
            newest = last_activity(past)
            if newest is None:
                self.lifecycle.deleted(partition, cid)
                self.backend.forget(cid)
                return Outcome.ABSENT
            expired = forget.reason is ForgetReason.EXPIRED
            if expired and newest != forget.idle_since:
                log.info("Keeping %s: active since its expiry was decided", cid)
                self.lifecycle.written(partition, cid, past)
                return Outcome.KEPT
            async with self.barrier.writes_of_one_event():
                del self.history[cid]
            self.lifecycle.deleted(partition, cid)
            self.backend.forget(cid)  # its KV cache too
            if expired:  # the sweep logs how many
                self.metrics.conversations_expired.inc()
                return Outcome.EXPIRED
            log.info("Forgot %s, as asked", cid)
            self.metrics.conversations_forgotten.inc()
            return Outcome.FORGOTTEN
        finally:
            self.lifecycle.applied(header_value(headers, MESSAGE_ID_HEADER))

    async def reply_to(
        self, chat: ChatMessage, message_id: str | None, partition: int | None, source: str
    ) -> Outcome:
        settings, cid = self.settings, chat.conversation_id
        past = self.history[cid]
        # With several messages in flight, a later one can commit with an earlier one's
        # offset still open; a crash then redelivers it answered. Its place in the log
        # recognises it when it has no uuid header.
        known_as = message_id or source
        if has_message(past, known_as):
            log.info("Skipping message %s of %s: already answered", known_as, cid)
            return Outcome.DUPLICATE
        window = history_window(past, settings.history_token_budget, self.backend, settings.ai_role)
        prompt = build_prompt(settings.persona, window, chat.text)
        reply_id = new_message_id()
        generation = await self.generate(prompt, cid, message_id, reply_id, partition)
        self.metrics.observe_generation(generation)
        reply = make_message(cid, settings.ai_role, generation.text or EMPTY_REPLY)
        headers = [(MESSAGE_ID_HEADER, reply_id.encode())]
        if message_id:
            headers.append((IN_REPLY_TO_HEADER, message_id.encode()))
        # The history is what tells a redelivered message it was answered: under exactly_once
        # it commits with the reply or not at all; under at_least_once it is written once the
        # reply is delivered (a crash in between answers the message twice, never loses it).
        async with self.barrier.writes_of_one_event():
            await self.delivered(
                self.topics.replies.send(
                    key=cid.encode(),
                    value=reply.to_bytes(),
                    headers=headers,
                    partition=partition if self.replies_on_source else None,
                )
            )
            stored = append_turns(
                past,
                [
                    make_turn(chat.role, chat.text, chat.Timestamp, known_as),
                    make_turn(reply.role, reply.text, reply.Timestamp, reply_id),
                ],
                settings.max_stored_turns,
            )
            self.history[cid] = stored
        self.lifecycle.written(partition, cid, stored)
        log.info(
            "Answered %s in %.2fs (%d tokens, %.1f tokens/s)",
            cid,
            generation.seconds,
            generation.completion_tokens,
            generation.tokens_per_second,
        )
        return Outcome.ANSWERED

    async def generate(
        self,
        prompt: Any,
        conversation_id: str,
        message_id: str | None,
        reply_id: str,
        partition: int | None,
    ) -> Generation:
        """Ask the model; with streaming on, its text goes to the stream topic as it comes
        (stream id = the reply's id), and the stream ends with why it ended, whatever happens."""
        timeout = self.settings.model_timeout
        if self.streams is None:
            return await self.backend.generate(
                prompt, timeout=timeout, conversation_id=conversation_id
            )
        stream: ReplyStream = self.streams.open(
            conversation_id,
            in_reply_to=message_id,
            stream_id=reply_id,
            partition=partition if self.stream_on_source else None,
        )
        try:
            generation = await self.backend.generate(
                prompt, timeout=timeout, on_token=stream.push, conversation_id=conversation_id
            )
        except ModelTimeout:
            await stream.finish(FinishReason.TIMEOUT)
            raise
        except Exception:
            await stream.finish(FinishReason.ERROR)
            raise
        except asyncio.CancelledError:
            # The worker is stopping: the message goes to the next owner of its partition,
            # which streams it anew. Saying "error" here would be wrong.
            stream.abandon()
            raise
        await stream.finish(FinishReason(generation.finish_reason))
        return generation

    async def dead_letter(
        self, key: bytes | None, value: bytes | None, headers: Any, reason: str, source: str
    ) -> None:
        """Send the record to the dead-letter topic and wait until Kafka has it; reduced
        (``dead_letters.reduced_dead_letter``) when it is too large with the reason headers.
        Raises :class:`DeadLetterFailed` when even that fails: the event must then not be
        acknowledged (see :func:`declare_agent`)."""
        log.warning("Dead-lettering %s: %s", source, reason)
        pairs = header_pairs(headers)
        whole = dead_letter(key, value, pairs, reason, source)
        if record_size(whole) > self.dead_letter_limit:
            log.warning(
                "The dead letter of %s is over %d bytes: sending it reduced",
                source,
                self.dead_letter_limit,
            )
        else:
            try:
                await self.send_dead_letter(whole)
                return
            except Exception as exc:
                if not too_large(exc):
                    raise DeadLetterFailed(f"could not dead-letter {source}: {exc!r}") from exc
                log.warning(
                    "The dead letter of %s was refused (%r): sending it reduced", source, exc
                )
        try:
            await self.send_dead_letter(reduced_dead_letter(key, value, pairs, reason, source))
        except Exception as exc:
            raise DeadLetterFailed(
                f"could not dead-letter {source}, even reduced: {exc!r}"
            ) from exc

    async def send_dead_letter(self, letter: DeadLetter) -> None:
        # Waited for under exactly_once too: a record the broker refuses fails only its own
        # delivery, and the transaction would commit the offset without it. Dead letters are
        # few, so the round trip is cheap.
        sending = self.topics.dead_letters.send(
            key=letter.key, value=letter.value, headers=letter.headers
        )
        await (await sending)

    async def delivered(self, sending: Awaitable[Awaitable[Any]]) -> None:
        """Send; under at_least_once also wait until Kafka has the record, since the offset may
        commit as soon as the event is done. (Under exactly_once the record is in the event's
        transaction: waiting would only cost a round trip per message.)"""
        delivery = await sending
        if not self.app.in_transaction:
            await delivery


def _source(message: Any) -> str:
    return f"{message.topic}/{message.partition}@{message.offset}"
