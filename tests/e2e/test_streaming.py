"""Streamed partial replies, end to end: real broker, real worker processes, both producer
families, the stand-in and the real model."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from marvin_faust.client import ChatClient, Reply
from marvin_faust.streaming import StreamChunk, parse_stream_chunk
from marvin_faust.testing.kafka import bootstrap_of, consume, replies_for, run, wire_value
from marvin_faust.testing.processes import settings_of
from marvin_faust.testing.traffic import FAMILIES, ChatProducer
from marvin_faust.testing.verifier import Sent

pytestmark = pytest.mark.kafka


def stream_topic(env: dict[str, str]) -> str:
    return f"{env['MARVIN_TOPIC']}-stream"


def chunks_of(records: list) -> list[tuple[StreamChunk, object]]:
    return [(parse_stream_chunk(r.value), r) for r in records]


async def topic_facts(bootstrap: str, topic: str) -> tuple[list[str], int, dict[str, str]]:
    """Every topic name; and of ``topic``, its partition count and configuration."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        topics = await admin.list_topics()
        if topic not in topics:
            return topics, 0, {}
        [description] = await admin.describe_topics([topic])
        [described] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)]
        )
        [resource] = described.resources
        return topics, len(description["partitions"]), {e[0]: e[1] for e in resource[4]}
    finally:
        await admin.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_reply_streams_on_its_messages_partition_before_it_is_sent(
    start_worker, worker_env, family
):
    env = {**worker_env, "MARVIN_STANDIN_LATENCY": "1.5"}
    start_worker(**env)
    bootstrap = bootstrap_of(env)
    cid, message_id = str(uuid.uuid4()), str(uuid.uuid4())

    async def send() -> int:
        async with ChatProducer(family, bootstrap, env["MARVIN_TOPIC"]) as producer:
            text = "one two three four five six seven eight nine ten eleven twelve"
            await producer.send([Sent(cid, message_id, wire_value(cid, text), valid=True)])
        return producer.partitions[message_id]

    partition = run(send())
    streamed = run(
        consume(
            bootstrap,
            stream_topic(env),
            until=lambda rs: any(json.loads(r.value)["done"] for r in rs),
        )
    )
    [reply] = replies_for(
        run(consume(bootstrap, env["MARVIN_TOPIC"], until=lambda rs: replies_for(rs, cid))), cid
    )
    chunks = chunks_of(streamed)
    assert {(c.conversation_id, c.in_reply_to, c.stream_id) for c, _ in chunks} == {
        (cid, message_id, reply["headers"]["uuid"].decode())
    }
    assert "".join(c.delta for c, _ in chunks) == reply["value"]["text"]
    assert [c.index for c, _ in chunks] == list(range(len(chunks)))
    assert [c.done for c, _ in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1][0].finish_reason == "stop"
    assert len(chunks) > 3, "13 tokens over 1.5 s came in too few chunks"
    for chunk, record in chunks:
        assert record.key == cid.encode() and record.partition == partition
        assert dict(record.headers) == {
            "stream-id": chunk.stream_id.encode(),
            "stream-index": str(chunk.index).encode(),
            "stream-last-message": b"true" if chunk.done else b"false",
        }
    # The topic the worker created: the chat topic's partitions, a short retention.
    _, partitions, config = run(topic_facts(bootstrap, stream_topic(env)))
    assert partitions == int(env["MARVIN_PARTITIONS"])
    assert config["retention.ms"] == "3600000"


def test_a_client_sees_partial_text_before_the_final_reply(start_worker, worker_env):
    env = {**worker_env, "MARVIN_STANDIN_LATENCY": "2"}
    start_worker(**env)
    cid = str(uuid.uuid4())

    async def converse() -> tuple[list[StreamChunk], str, float, float]:
        seen: list[tuple[float, StreamChunk]] = []
        loop = asyncio.get_running_loop()
        async with ChatClient(settings_of(env), stream=True) as client:
            started = loop.time()
            reply = await client.ask(
                cid, "tell me everything", 60, on_chunk=lambda c: seen.append((loop.time(), c))
            )
            answered = loop.time() - started
        return [c for _, c in seen], reply.text, seen[0][0] - started, answered

    chunks, text, first_chunk, answered = run(converse())
    assert "".join(c.delta for c in chunks) == text
    assert chunks[-1].done
    # The first token is written about 0.7 s into a 2 s reply, the reply shows after 2 s.
    assert first_chunk < answered


def test_streaming_off_creates_no_stream_topic_and_answers_as_before(start_worker, worker_env):
    env = {**worker_env, "MARVIN_STREAM_TOPIC": ""}
    start_worker(**env)
    cid = str(uuid.uuid4())

    async def converse() -> tuple[str, list[StreamChunk]]:
        chunks: list[StreamChunk] = []
        async with ChatClient(settings_of(env), stream=True) as client:
            reply = await client.ask(cid, "Hello", 60, on_chunk=chunks.append)
        return reply.text, chunks

    text, chunks = run(converse())
    assert text == "human: Hello"
    assert chunks == []
    topics, _, _ = run(topic_facts(bootstrap_of(env), stream_topic(env)))
    assert env["MARVIN_TOPIC"] in topics and stream_topic(env) not in topics


@pytest.mark.slow
def test_a_worker_killed_mid_stream_restarts_the_stream_then_replies_once(start_worker, worker_env):
    env = {**worker_env, "MARVIN_STANDIN_LATENCY": "6"}
    worker = start_worker(**env)
    cid = str(uuid.uuid4())

    async def converse() -> tuple[dict[str, list[StreamChunk]], Reply]:
        streams: dict[str, list[StreamChunk]] = {}
        async with ChatClient(settings_of(env), stream=True) as client:
            text = " ".join(f"word{i}" for i in range(30))
            _, message_id = await client.post(cid, text)
            async with asyncio.timeout(120):
                async for event in client.events():
                    if isinstance(event, StreamChunk) and event.in_reply_to == message_id:
                        streams.setdefault(event.stream_id, []).append(event)
                        if len(streams) == 1 and len(streams[event.stream_id]) == 3:
                            await asyncio.to_thread(worker.kill)  # mid-stream
                            await asyncio.to_thread(start_worker, worker.data_dir, **env)
                    elif isinstance(event, Reply) and event.in_reply_to == message_id:
                        return streams, event
        raise AssertionError("no reply")

    streams, reply = run(converse())
    first, *_, last = streams
    assert first != last, "the redelivered message streamed under the same stream id"
    assert not any(c.done for c in streams[first]), "the killed worker ended its stream"
    assert reply.message_id == last
    assert "".join(c.delta for c in streams[last]) == reply.message.text
    assert [c.index for c in streams[last]] == list(range(len(streams[last])))
    # Exactly one reply on the topic, the one the client took.
    records = run(
        consume(
            bootstrap_of(env), env["MARVIN_TOPIC"], until=lambda rs: replies_for(rs, cid), settle=3
        )
    )
    assert [r["headers"]["uuid"].decode() for r in replies_for(records, cid)] == [last]


@pytest.mark.model
def test_the_real_models_stream_adds_up_to_its_reply(start_worker, worker_env):
    env = {**worker_env, "MARVIN_BACKEND": "llamacpp", "MARVIN_MAX_TOKENS": "60"}
    start_worker(**env)
    cid = str(uuid.uuid4())

    async def converse() -> tuple[list[StreamChunk], str]:
        chunks: list[StreamChunk] = []
        async with ChatClient(settings_of(env), stream=True) as client:
            reply = await client.ask(cid, "Tell me about your day.", 120, on_chunk=chunks.append)
        return chunks, reply.text

    chunks, text = run(converse())
    assert "".join(c.delta for c in chunks).strip() == text
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.done for c in chunks].count(True) == 1 and chunks[-1].done
    assert chunks[-1].finish_reason in ("stop", "length")
    assert len(chunks) > 1
