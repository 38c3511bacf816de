"""Stream chunks: the wire format, the pacing rule and one reply's stream, without Kafka."""

from __future__ import annotations

import asyncio
import json

import pytest

from marvin_faust.models import BadMessage
from marvin_faust.streaming import (
    CHUNK_TOKENS,
    ChunkPacer,
    FinishReason,
    ReplyStream,
    StreamChunk,
    parse_stream_chunk,
    printable,
)


def test_a_chunk_on_the_wire_and_back():
    chunk = StreamChunk("c1", "m1", "s1", 0, "Hel", done=False)
    assert json.loads(chunk.to_bytes()) == {
        "conversation_id": "c1",
        "in_reply_to": "m1",
        "stream_id": "s1",
        "index": 0,
        "delta": "Hel",
        "done": False,
    }
    assert chunk.headers() == [
        ("stream-id", b"s1"),
        ("stream-index", b"0"),
        ("stream-last-message", b"false"),
    ]
    assert parse_stream_chunk(chunk.to_bytes()) == chunk


def test_the_last_chunk_carries_its_finish_reason():
    last = StreamChunk("c1", None, "s1", 3, "", done=True, finish_reason=FinishReason.LENGTH)
    assert json.loads(last.to_bytes())["finish_reason"] == "length"
    assert dict(last.headers())["stream-last-message"] == b"true"
    assert parse_stream_chunk(last.to_bytes()) == last


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\xff", "not UTF-8 JSON"),
        (b"[]", "not a JSON object"),
        (b'{"conversation_id": "c"}', "'in_reply_to' is missing"),
        (
            b'{"conversation_id":"c","in_reply_to":null,"stream_id":"s","index":"0",'
            b'"delta":"","done":false}',
            "'index' is missing or mistyped",
        ),
        (
            b'{"conversation_id":"c","in_reply_to":null,"stream_id":"s","index":0,'
            b'"delta":"","done":true,"finish_reason":"bored"}',
            "unknown finish_reason 'bored'",
        ),
    ],
)
def test_a_bad_chunk_says_what_is_wrong(value, reason):
    with pytest.raises(BadMessage, match=reason):
        parse_stream_chunk(value)


def test_printable_keeps_text_and_drops_terminal_control():
    assert printable("a\tb\nc") == "a\tb\nc"
    assert printable("\x1b[2J\x1b]0;pwned\x07red\x9b31m") == "[2J]0;pwnedred31m"


class TestChunkPacer:
    def test_the_first_token_is_due_at_once(self):
        pacer = ChunkPacer(interval=0.05)
        assert pacer.offer("Hi", now=10.0) == "Hi"

    def test_later_tokens_wait_for_the_interval(self):
        pacer = ChunkPacer(interval=0.05)
        pacer.offer("a", now=10.0)
        assert pacer.offer("b", now=10.01) is None
        assert pacer.offer("c", now=10.02) is None
        assert pacer.deadline == pytest.approx(10.05)
        assert pacer.offer("d", now=10.06) == "bcd"
        assert pacer.deadline is None

    def test_a_full_buffer_goes_out_before_the_interval(self):
        pacer = ChunkPacer(interval=10.0)
        pacer.offer("first", now=0.0)
        sent = [pacer.offer(f"{i} ", now=0.001) for i in range(CHUNK_TOKENS)]
        assert sent[:-1] == [None] * (CHUNK_TOKENS - 1)
        assert sent[-1] == "".join(f"{i} " for i in range(CHUNK_TOKENS))

    def test_the_interval_restarts_when_a_chunk_is_taken(self):
        pacer = ChunkPacer(interval=0.05)
        pacer.offer("a", now=0.0)
        pacer.offer("b", now=0.01)
        assert pacer.take(now=0.05) == "b"
        assert pacer.offer("c", now=0.07) is None  # 20 ms after the last chunk
        assert pacer.deadline == pytest.approx(0.10)


async def collected_stream(interval: float) -> tuple[ReplyStream, list[StreamChunk]]:
    sent: list[StreamChunk] = []

    async def send(chunk: StreamChunk) -> None:
        sent.append(chunk)

    stream = ReplyStream(
        send, conversation_id="c1", in_reply_to="m1", stream_id="s1", interval=interval
    )
    return stream, sent


async def test_a_stream_sends_every_token_in_order_and_ends_once():
    stream, sent = await collected_stream(interval=0.05)
    words = [f" w{i}" for i in range(40)]
    for word in words:
        stream.push(word)
        await asyncio.sleep(0.002)
    await stream.finish(FinishReason.STOP)
    await stream.finish(FinishReason.ERROR)  # a second end changes nothing
    assert "".join(c.delta for c in sent) == "".join(words)
    assert [c.index for c in sent] == list(range(len(sent)))
    assert [c.done for c in sent] == [False] * (len(sent) - 1) + [True]
    assert sent[-1].finish_reason is FinishReason.STOP
    assert sent[0].delta == " w0"  # the first token alone, at once
    # Paced: far fewer records than tokens, none over the token bound.
    assert 2 < len(sent) < len(words)
    assert all(c.delta.count(" ") <= CHUNK_TOKENS for c in sent)
    assert {(c.conversation_id, c.in_reply_to, c.stream_id) for c in sent} == {("c1", "m1", "s1")}


async def test_a_buffered_token_goes_out_when_its_interval_ends():
    stream, sent = await collected_stream(interval=0.05)
    stream.push("a")
    stream.push("b")
    await asyncio.sleep(0.2)  # no more tokens: the timer, not the next token, sends "b"
    assert [c.delta for c in sent] == ["a", "b"]
    await stream.finish(FinishReason.STOP)
    assert sent[-1] == StreamChunk("c1", "m1", "s1", 2, "", done=True, finish_reason="stop")


async def test_a_failed_generation_ends_its_stream_with_the_reason():
    stream, sent = await collected_stream(interval=0.05)
    stream.push("partial")
    await stream.finish(FinishReason.TIMEOUT)
    stream.push("late")  # after the end: dropped
    await asyncio.sleep(0.01)
    assert [(c.delta, c.done, c.finish_reason) for c in sent] == [
        ("partial", False, None),
        ("", True, FinishReason.TIMEOUT),
    ]


async def test_a_chunk_that_cannot_be_sent_does_not_stop_the_stream():
    attempts: list[int] = []

    async def flaky(chunk: StreamChunk) -> None:
        attempts.append(chunk.index)
        if chunk.index == 0:
            raise ConnectionError("broker gone")

    stream = ReplyStream(flaky, conversation_id="c", in_reply_to=None, stream_id="s", interval=0)
    stream.push("a")
    await asyncio.sleep(0.01)
    stream.push("b")
    await stream.finish(FinishReason.STOP)
    assert attempts == [0, 1, 2]
