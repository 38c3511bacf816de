"""The agent under ``test_context()``: stand-in model, memory store, sends captured."""

from __future__ import annotations

import asyncio
import json
import threading
from unittest.mock import AsyncMock

import pytest
from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from faust.exceptions import ProducerSendError

from marvin_faust import agents, dead_letters
from marvin_faust.llm.standin import FAIL_MARKER, HANG_MARKER
from marvin_faust.streaming import ReplyStream, StreamChunk


def wire(cid: str, text: str, role: str = "human", **extra) -> bytes:
    return json.dumps(
        {
            "uuid": cid,
            "role": role,
            "text": text,
            "conversation_id": cid,
            "Timestamp": 1_700_000_000_000_000_000,
            **extra,
        }
    ).encode()


@pytest.fixture()
def app(unit_app):
    return unit_app


@pytest.fixture()
async def agent(app, monkeypatch):
    app.finalize()
    app.flow_control.resume()
    if not app.backend.loaded:
        await app.backend.start()
    delivered = asyncio.get_running_loop().create_future()  # what a send returns: its delivery
    delivered.set_result(None)
    topics = app.chat_topics
    monkeypatch.setattr(topics.replies, "send", AsyncMock(return_value=delivered))
    monkeypatch.setattr(topics.dead_letters, "send", AsyncMock(return_value=delivered))
    # No broker here: no topic to declare, no max.message.bytes to read.
    monkeypatch.setattr(topics.dead_letters, "maybe_declare", AsyncMock())
    monkeypatch.setattr(agents, "max_message_bytes", AsyncMock(return_value=None))
    async with app.answer.test_context() as test_agent:
        test_agent.replies = lambda: [dict(c.kwargs) for c in topics.replies.send.call_args_list]
        test_agent.dead_letters = lambda: [
            dict(c.kwargs) for c in topics.dead_letters.send.call_args_list
        ]
        test_agent.history, test_agent.settings = app.history, app.settings
        test_agent.answerer, test_agent.topics = app.answer.answerer, topics
        yield test_agent
    app.history.data.clear()


def reasons(agent) -> list[str]:
    return [dict(d["headers"])[dead_letters.REASON_HEADER].decode() for d in agent.dead_letters()]


async def test_a_human_message_is_answered_and_stored(agent):
    await agent.put(wire("c1", "Hello"), key=b"c1", headers={"uuid": b"m1"})
    [reply] = agent.replies()
    assert reply["key"] == b"c1"
    value = json.loads(reply["value"])
    assert value["role"] == "AI" and value["conversation_id"] == value["uuid"] == "c1"
    assert value["text"] == "human: Hello"  # the stand-in echoes its prompt
    headers = dict(reply["headers"])
    assert headers["in-reply-to"] == b"m1"
    stored = agent.history["c1"]
    assert [(t["role"], t["text"], t["message_id"]) for t in stored] == [
        ("human", "Hello", "m1"),
        ("AI", "human: Hello", headers["uuid"].decode()),
    ]
    assert agent.dead_letters() == []


async def test_the_second_message_sees_the_first_turn_in_its_prompt(agent):
    await agent.put(wire("c2", "first"), key=b"c2")
    await agent.put(wire("c2", "second"), key=b"c2")
    second = json.loads(agent.replies()[1]["value"])["text"]
    assert second == "human: first\nai: human: first\nhuman: second"
    assert len(agent.history["c2"]) == 4


async def test_history_is_assigned_not_mutated(agent):
    await agent.put(wire("c3", "one"), key=b"c3")
    before = agent.history["c3"]
    await agent.put(wire("c3", "two"), key=b"c3")
    assert len(before) == 2  # the old value object was left alone
    assert len(agent.history["c3"]) == 4


async def test_the_bots_own_messages_are_dropped(agent):
    await agent.put(wire("c4", "hi"), key=b"c4")
    await agent.put(wire("c4", "I am a reply", role="AI"), key=b"c4")
    assert len(agent.replies()) == 1
    assert [t["text"] for t in agent.history["c4"]] == ["hi", "human: hi"]
    assert agent.dead_letters() == []


async def test_the_greeting_is_stored_as_the_first_ai_turn(agent):
    await agent.put(
        wire("c5", agent.settings.greeting, role="AI"), key=b"c5", headers={"uuid": b"g"}
    )
    assert agent.replies() == []
    assert agent.history["c5"] == [
        {
            "role": "AI",
            "text": agent.settings.greeting,
            "timestamp": 1_700_000_000_000_000_000,
            "message_id": "g",
        }
    ]
    await agent.put(wire("c5", "What?"), key=b"c5")
    assert [t["role"] for t in agent.history["c5"]] == ["AI", "human", "AI"]
    # The model saw the greeting, after the empty human turn that opens the window.
    reply = json.loads(agent.replies()[-1]["value"])
    assert reply["text"] == f"human: \nai: {agent.settings.greeting}\nhuman: What?"


async def test_a_redelivered_message_is_answered_once(agent):
    outcomes = []
    for _ in range(2):
        event = await agent.put(wire("c6", "once"), key=b"c6", headers={"uuid": b"same"})
        outcomes.append(agent.results[event.message.offset])
    assert outcomes == [agents.Outcome.ANSWERED, agents.Outcome.DUPLICATE]
    assert len(agent.replies()) == 1
    assert len(agent.history["c6"]) == 2


async def test_stored_history_is_bounded(agent, monkeypatch):
    monkeypatch.setattr(
        agent.answerer, "settings", agent.settings.model_copy(update={"max_stored_turns": 4})
    )
    for i in range(5):
        await agent.put(wire("c7", f"m{i}"), key=b"c7")
    stored = agent.history["c7"]
    assert len(stored) == 4
    assert stored[-2]["text"] == "m4"


@pytest.mark.parametrize(
    ("value", "key", "reason"),
    [
        (b"{not json", b"c8", "bad message: value is not JSON"),
        (b"\xff\xfe", b"c8", "bad message: value is not UTF-8"),
        (None, b"c8", "bad message: null value"),
        (wire("c8", "hi", Timestamp="yesterday"), b"c8", "field 'Timestamp' must be int"),
        (json.dumps({"role": "human"}).encode(), b"c8", "missing field 'uuid'"),
        (wire("c8", ""), b"c8", "empty text"),
        (wire("c8", "x" * 5000), b"c8", "text has 5000 characters"),
        (wire("c8", "hi"), b"other", "the record key must be the conversation_id"),
        (wire("c8", "hi"), None, "the record key must be the conversation_id"),
        (wire("c8", "hi", role="system"), b"c8", "unknown role 'system'"),
        # An id the views would refuse: its history could never be read.
        (wire("x?limit=1", "hi"), b"x?limit=1", "conversation_id 'x?limit=1' may only hold"),
        (wire("../health", "hi"), b"../health", "conversation_id '../health' may only hold"),
        (wire("c" * 129, "hi"), b"c" * 129, "conversation_id has 129 characters"),
        (wire("c8", f"please {FAIL_MARKER}"), b"c8", "model failed: RuntimeError"),
    ],
)
async def test_bad_input_is_dead_lettered_with_original_bytes_and_reason(agent, value, key, reason):
    event = await agent.put(value, key=key, headers={"uuid": b"bad-1"})
    assert agent.results[event.message.offset] == agents.Outcome.DEAD_LETTERED
    [letter] = agent.dead_letters()
    assert letter["value"] == value and letter["key"] == key
    headers = dict(letter["headers"])
    assert reason in headers[dead_letters.REASON_HEADER].decode()
    assert headers["uuid"] == b"bad-1"
    assert headers[dead_letters.SOURCE_HEADER].startswith(b"chat/")
    assert agent.replies() == []
    assert agent.history["c8"] == []
    # and the agent keeps going
    await agent.put(wire("c8", "still there?"), key=b"c8")
    assert len(agent.replies()) == 1


async def test_a_model_timeout_is_dead_lettered(agent, monkeypatch):
    monkeypatch.setattr(
        agent.answerer, "settings", agent.settings.model_copy(update={"model_timeout": 0.2})
    )
    # One generation at a time: if the timeout did not stop the hung one, the next message
    # would wait for its slot, time out too, and be dead-lettered instead of answered.
    monkeypatch.setattr(agent.answerer.backend, "_slots", threading.BoundedSemaphore(1))
    await agent.put(wire("c9", f"wait {HANG_MARKER}"), key=b"c9")
    assert reasons(agent) == [reasons(agent)[0]]
    assert reasons(agent)[0].startswith("model failed: no reply after")
    await agent.put(wire("c9", "and now?"), key=b"c9")
    assert len(agent.replies()) == 1


def size_error() -> ProducerSendError:
    """What Faust raises for a record over the producer's max_request_size."""
    try:
        raise MessageSizeTooLargeError("over max_request_size")
    except MessageSizeTooLargeError as exc:
        try:
            raise ProducerSendError(f"Error while sending: {exc!r}") from exc
        except ProducerSendError as wrapped:
            return wrapped


async def test_a_dead_letter_too_large_with_its_reason_goes_reduced(agent, monkeypatch):
    delivered = asyncio.get_running_loop().create_future()
    delivered.set_result(None)
    send = AsyncMock(side_effect=[size_error(), delivered])
    monkeypatch.setattr(agent.topics.dead_letters, "send", send)
    value = b"{" + b"x" * 999_000
    await agent.answerer.dead_letter(b"c11", value, [("uuid", b"m-1")], "bad", "chat/0@5")
    full, reduced = (call.kwargs for call in send.call_args_list)
    assert full["value"] == value
    assert reduced["value"] == b"chat/0@5" and reduced["key"] == b"c11"
    headers = dict(reduced["headers"])
    assert headers["uuid"] == b"m-1" and headers[dead_letters.REASON_HEADER] == b"bad"


async def test_a_dead_letter_over_the_topics_limit_goes_reduced_at_once(agent, monkeypatch):
    # Under exactly_once a refusal by the broker would leave the producer unable to send the
    # reduced one (a gap in its sequence): what the topic will refuse is not sent at all.
    monkeypatch.setattr(agent.answerer, "dead_letter_limit", 2_000)
    await agent.answerer.dead_letter(b"c14", b"{" * 1_950, [], "bad", "chat/0@7")
    [letter] = agent.dead_letters()
    assert letter["value"] == b"chat/0@7"
    await agent.answerer.dead_letter(b"c14", b"{" * 1_800, [], "bad", "chat/0@8")
    assert agent.dead_letters()[-1]["value"] == b"{" * 1_800  # under it: whole


@pytest.mark.parametrize(
    "failures",
    [
        [size_error(), size_error()],  # too large even reduced
        [KafkaTimeoutError()],  # not a size error: no reduced retry
    ],
)
async def test_a_dead_letter_that_cannot_be_sent_raises(agent, monkeypatch, failures):
    send = AsyncMock(side_effect=failures)
    monkeypatch.setattr(agent.topics.dead_letters, "send", send)
    with pytest.raises(agents.DeadLetterFailed, match="could not dead-letter chat/0@5"):
        await agent.answerer.dead_letter(b"c12", b"{", [], "bad", "chat/0@5")
    assert send.call_count == len(failures)


async def test_a_dead_letter_refused_on_delivery_goes_reduced(agent, monkeypatch):
    # A dead letter's delivery is waited for, in a transaction too (unlike a reply's): a record
    # the broker refuses fails only its delivery, and the offset would commit without it.
    refused = asyncio.get_running_loop().create_future()
    refused.set_exception(MessageSizeTooLargeError())
    delivered = asyncio.get_running_loop().create_future()
    delivered.set_result(None)
    send = AsyncMock(side_effect=[refused, delivered])
    monkeypatch.setattr(agent.topics.dead_letters, "send", send)
    await agent.answerer.dead_letter(b"c13", b"{", [], "bad", "chat/0@6")
    assert [call.kwargs["value"] for call in send.call_args_list] == [b"{", b"chat/0@6"]


async def test_the_reply_goes_to_the_partition_its_message_came_from(agent):
    # A CRC32 producer (librdkafka) may put a conversation where murmur2 would not.
    await agent.put(wire("c9", "Hello"), key=b"c9", partition=3)
    [reply] = agent.replies()
    assert reply["partition"] == 3


async def test_at_least_once_writes_the_history_only_once_the_reply_is_delivered(
    agent, monkeypatch
):
    # Outside a worker there are no transactions, as under at_least_once.
    assert not agent.answerer.app.in_transaction
    delivery = asyncio.get_running_loop().create_future()
    monkeypatch.setattr(agent.topics.replies, "send", AsyncMock(return_value=delivery))
    handling = asyncio.ensure_future(agent.put(wire("c10", "Hello"), key=b"c10"))
    for _ in range(50):
        await asyncio.sleep(0)
    assert agent.topics.replies.send.await_count == 1
    assert agent.history["c10"] == [], "the history said answered before the reply was delivered"
    delivery.set_result(None)
    await handling
    assert [t["role"] for t in agent.history["c10"]] == ["human", "AI"]


class CollectingStreams:
    """Stands in for ``StreamPublisher``: every chunk of every stream, in a list."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.chunks: list[StreamChunk] = []
        self.partitions: list[int | None] = []

    def open(self, conversation_id, *, in_reply_to, stream_id, partition) -> ReplyStream:
        self.partitions.append(partition)

        async def send(chunk: StreamChunk) -> None:
            self.chunks.append(chunk)

        return ReplyStream(
            send,
            conversation_id=conversation_id,
            in_reply_to=in_reply_to,
            stream_id=stream_id,
            interval=self.interval,
        )


@pytest.fixture()
def streams(agent, monkeypatch) -> CollectingStreams:
    collecting = CollectingStreams(interval=0.01)
    monkeypatch.setattr(agent.answerer, "streams", collecting)
    monkeypatch.setattr(agent.answerer.backend, "latency", 0.2)  # a token every few ms
    return collecting


async def test_a_reply_streams_before_it_is_sent(agent, streams):
    await agent.put(wire("s1", "one two three four five six"), key=b"s1", headers={"uuid": b"m"})
    [reply] = agent.replies()
    reply_id = dict(reply["headers"])["uuid"].decode()
    chunks = streams.chunks
    assert {(c.conversation_id, c.in_reply_to, c.stream_id) for c in chunks} == {
        ("s1", "m", reply_id)
    }
    assert "".join(c.delta for c in chunks) == json.loads(reply["value"])["text"]
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.done for c in chunks].count(True) == 1 and chunks[-1].done
    assert chunks[-1].finish_reason == "stop"
    assert len(chunks) >= 3  # the stand-in's 7 tokens did not come as one chunk
    assert streams.partitions == [0]  # the message's partition


async def test_a_failed_generation_ends_its_stream_with_error(agent, streams):
    await agent.put(wire("s2", f"oops {FAIL_MARKER}"), key=b"s2")
    assert [(c.done, c.finish_reason) for c in streams.chunks] == [(True, "error")]
    assert len(agent.dead_letters()) == 1 and agent.replies() == []


async def test_a_timed_out_generation_ends_its_stream_with_timeout(agent, streams, monkeypatch):
    monkeypatch.setattr(
        agent.answerer, "settings", agent.settings.model_copy(update={"model_timeout": 0.2})
    )
    await agent.put(wire("s3", f"wait {HANG_MARKER}"), key=b"s3")
    assert streams.chunks[-1].done and streams.chunks[-1].finish_reason == "timeout"
    assert reasons(agent)[0].startswith("model failed: no reply after")


async def test_a_redelivered_message_streams_nothing(agent, streams):
    for _ in range(2):
        await agent.put(wire("s4", "once"), key=b"s4", headers={"uuid": b"same"})
    assert len({c.stream_id for c in streams.chunks}) == 1
    assert len(agent.replies()) == 1


async def test_a_redelivered_message_without_a_uuid_header_is_known_by_its_place(agent):
    outcomes = []
    for _ in range(2):
        agent.sent_offset = 7  # the same record, read again
        event = await agent.put(wire("c11", "hi"), key=b"c11", partition=1)
        outcomes.append(agent.results[agent.processed_offset - 1])
    assert outcomes == [agents.Outcome.ANSWERED, agents.Outcome.DUPLICATE]
    assert agent.history["c11"][0]["message_id"] == f"{event.message.topic}/1@7"
    assert "in-reply-to" not in dict(agent.replies()[0]["headers"])


async def test_conversations_are_answered_at_once_each_one_in_order(agent, monkeypatch):
    backend, generate = agent.answerer.backend, agent.answerer.backend.generate
    running, most = 0, 0

    async def counting(*args, **kwargs):
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            return await generate(*args, **kwargs)
        finally:
            running -= 1

    monkeypatch.setattr(backend, "generate", counting)
    monkeypatch.setattr(backend, "latency", 0.3)
    sent = [("p1", "first"), ("p2", "other"), ("p1", "second"), ("p3", "third")]
    for cid, text in sent:
        await agent.put(wire(cid, text), key=cid.encode(), wait=False)
    for _ in range(200):
        if len(agent.replies()) == len(sent):
            break
        await asyncio.sleep(0.02)
    texts = [json.loads(reply["value"])["text"] for reply in agent.replies()]
    assert most == 3  # p1's second message waited for its first; the others did not
    # p1's second reply was written after its first, and saw it in its prompt.
    assert texts.index("human: first") < texts.index(
        "human: first\nai: human: first\nhuman: second"
    )
    assert sorted(texts) == sorted(
        [
            "human: first",
            "human: other",
            "human: first\nai: human: first\nhuman: second",
            "human: third",
        ]
    )


def forget_record(cid: str, **fields) -> tuple[bytes, dict]:
    from marvin_faust.models import Forget, make_forget

    forget = make_forget(cid, **fields)
    return forget.to_bytes(), dict(Forget.headers(f"forget-{cid}"))


async def test_a_forget_record_deletes_the_history_and_a_new_message_starts_afresh(agent):
    await agent.put(wire("f1", "remember me"), key=b"f1")
    lifecycle = agent.answerer.lifecycle
    assert lifecycle.index.last_activity(0, "f1") == agent.history["f1"][-1]["timestamp"]
    value, headers = forget_record("f1")
    event = await agent.put(value, key=b"f1", headers=headers)
    assert agent.results[event.message.offset] == agents.Outcome.FORGOTTEN
    assert "f1" not in agent.history
    assert agent.answerer.backend.forgotten[-1] == "f1"  # its KV cache too
    assert lifecycle.index.last_activity(0, "f1") is None
    assert agent.replies()[1:] == [] and agent.dead_letters() == []
    # idempotent: nothing left to delete
    event = await agent.put(value, key=b"f1", headers=headers)
    assert agent.results[event.message.offset] == agents.Outcome.ABSENT
    await agent.put(wire("f1", "who are you?"), key=b"f1")
    assert [t["text"] for t in agent.history["f1"]] == ["who are you?", "human: who are you?"]


async def test_an_expiry_deletes_only_if_the_newest_turn_is_the_one_the_sweep_saw(agent):
    from marvin_faust.models import ForgetReason

    await agent.put(wire("f2", "hello"), key=b"f2")
    seen = agent.history["f2"][-1]["timestamp"]
    await agent.put(wire("f2", "still here"), key=b"f2")  # after the sweep decided
    value, headers = forget_record("f2", reason=ForgetReason.EXPIRED, idle_since=seen)
    event = await agent.put(value, key=b"f2", headers=headers)
    assert agent.results[event.message.offset] == agents.Outcome.KEPT
    assert len(agent.history["f2"]) == 4
    assert "f2" not in agent.answerer.backend.forgotten
    newest = agent.history["f2"][-1]["timestamp"]
    value, headers = forget_record("f2", reason=ForgetReason.EXPIRED, idle_since=newest)
    event = await agent.put(value, key=b"f2", headers=headers)
    assert agent.results[event.message.offset] == agents.Outcome.EXPIRED
    assert "f2" not in agent.history
    assert agent.answerer.backend.forgotten[-1] == "f2"


@pytest.mark.parametrize(
    ("value", "key", "headers", "reason"),
    [
        (b"{}", b"f3", {"marvin-control": b"reboot"}, "unknown marvin-control 'reboot'"),
        (b"[]", b"f3", {"marvin-control": b"forget"}, "not a JSON object"),
        (forget_record("f3")[0], b"other", {"marvin-control": b"forget"}, "record key must be"),
    ],
)
async def test_a_bad_control_record_is_dead_lettered(agent, value, key, headers, reason):
    await agent.put(wire("f3", "keep me"), key=b"f3")
    event = await agent.put(value, key=key, headers=headers)
    assert agent.results[event.message.offset] == agents.Outcome.DEAD_LETTERED
    [letter] = agent.dead_letters()
    assert reason in dict(letter["headers"])[dead_letters.REASON_HEADER].decode()
    assert len(agent.history["f3"]) == 2
