"""Traffic from both client families people use, under both guarantees (real broker, real
worker processes, stand-in model at 20 ms).

librdkafka (confluent-kafka, Quix Streams) puts a key where CRC32 says, aiokafka and the Java
client where murmur2 says. Before faust_fixes.py's fix 7 and replies on the message's partition, a
librdkafka front end stalled an exactly_once worker until its transactions timed out and it
crashed (``ProducerFenced``). Each run prints its figures.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from marvin_faust.testing.kafka import bootstrap_of, consume, create_topic, run
from marvin_faust.testing.processes import cli_env, say
from marvin_faust.testing.traffic import (
    PARTITIONER_OF,
    ChatProducer,
    ReplyReader,
    one_in_flight,
    percentile,
)
from marvin_faust.testing.verifier import Sent, conversation_messages, verify
from marvin_faust.testing.web import get

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(600)]

GUARANTEES = ("exactly_once", "at_least_once")
FATAL_SIGNS = ("ProducerFenced", "Crashed reason", "We experienced a crash")


def one_at_a_time(env: dict[str, str], family: str, sent: list[Sent]) -> str:
    """Scenario (a): 20 conversations, one message in flight. Returns the figures."""

    async def drive():
        bootstrap = bootstrap_of(env)
        async with (
            ChatProducer(family, bootstrap, env["MARVIN_TOPIC"]) as producer,
            ReplyReader(bootstrap, env["MARVIN_TOPIC"]) as reader,
        ):
            return await one_in_flight(producer, reader, sent, timeout=10.0)

    result = run(drive())
    assert not result.unanswered, f"{len(result.unanswered)} of {len(sent)} got no reply in 10 s"
    p50, p99 = (1000 * percentile(result.latencies, q) for q in (0.5, 0.99))
    return f"one in flight: {len(sent)} answered, p50 {p50:.0f} ms, p99 {p99:.0f} ms"


def all_at_once(env: dict[str, str], family: str, sent: list[Sent]) -> str:
    """Scenario (b): every message sent at once. Returns the figures."""

    async def drive() -> float:
        bootstrap = bootstrap_of(env)
        async with ReplyReader(bootstrap, env["MARVIN_TOPIC"]) as reader:
            started = time.monotonic()
            async with ChatProducer(family, bootstrap, env["MARVIN_TOPIC"]) as producer:
                await producer.send(sent)
            answered = await reader.wait_for([m.message_id for m in sent], timeout=240.0)
            missing = sum(m.message_id not in reader.replies for m in sent)
            assert answered, f"{missing} of {len(sent)} unanswered after 240 s"
            return time.monotonic() - started

    seconds = run(drive())
    return f"all at once: {len(sent)} answered in {seconds:.1f} s ({len(sent) / seconds:.0f} msg/s)"


def check_exactly_once(env: dict[str, str], sent: list[Sent], workers: list) -> None:
    report = run(verify(bootstrap_of(env), env, sent))
    assert report.ok, report.summary()
    for worker in workers:
        signs = [sign for sign in FATAL_SIGNS if sign in worker.log_text()]
        assert not signs, f"{signs} in the worker log:\n{worker.tail()}"


@pytest.mark.parametrize("guarantee", GUARANTEES)
@pytest.mark.parametrize("family", ["aiokafka", "librdkafka"])
def test_traffic_from_a_client_family(start_worker, worker_env, family, guarantee):
    """(a) one in flight, (b) 1,000 at once, (c) views from either of two workers, with the
    worker told the family's partitioner (MARVIN_PARTITIONER)."""
    settings = {
        "MARVIN_PARTITIONS": "4",
        "MARVIN_STANDIN_LATENCY": "0.02",
        "MARVIN_PROCESSING_GUARANTEE": guarantee,
        "MARVIN_PARTITIONER": PARTITIONER_OF[family],
    }
    env = {**worker_env, **settings}
    first = start_worker(**settings)
    one_by_one = conversation_messages(20, 10)
    figures = [one_at_a_time(env, family, one_by_one)]
    second = start_worker(**settings)
    flood = conversation_messages(100, 10)
    figures.append(all_at_once(env, family, flood))
    check_exactly_once(env, one_by_one + flood, [first, second])

    # (c) Every conversation's history from either worker: table_route finds its owner.
    turns = {m.cid: 0 for m in one_by_one + flood}
    for m in one_by_one + flood:
        turns[m.cid] += 2
    for worker in (first, second):
        for cid, expected in turns.items():
            status, body = get(f"{worker.url}/conversations/{cid}/")
            assert status == 200, (worker.url, cid, body)
            assert body["total_turns"] == expected
    print(f"\n[{family}, {guarantee}, 2 workers] " + "; ".join(figures))


@pytest.mark.parametrize("guarantee", GUARANTEES)
def test_a_librdkafka_front_end_and_a_worker_left_at_murmur2(start_worker, worker_env, guarantee):
    """What a new user has: confluent-kafka's defaults on one side, every worker setting at its
    default on the other. Nothing stalls, nothing is lost, no reply is doubled."""
    settings = {
        "MARVIN_PARTITIONS": "4",
        "MARVIN_STANDIN_LATENCY": "0.02",
        "MARVIN_PROCESSING_GUARANTEE": guarantee,
    }
    env = {**worker_env, **settings}
    worker = start_worker(**settings)
    one_by_one, flood = conversation_messages(20, 5), conversation_messages(100, 10)
    figures = [
        one_at_a_time(env, "librdkafka", one_by_one),
        all_at_once(env, "librdkafka", flood),
    ]
    check_exactly_once(env, one_by_one + flood, [worker])
    print(f"\n[librdkafka, worker murmur2, {guarantee}] " + "; ".join(figures))


def test_a_fenced_worker_exits_non_zero_within_seconds_and_is_not_ready(start_worker, worker_env):
    """Another producer takes over the worker's transactional id, as a zombie's successor
    does: the worker's next commit is fenced. It must end, saying why in one line, so that a
    supervisor restarts it, and never answer ready meanwhile."""
    from aiokafka import AIOKafkaProducer

    settings = {"MARVIN_PARTITIONS": "1", "MARVIN_STANDIN_LATENCY": "0.02"}
    env = {**worker_env, **settings}
    worker = start_worker(**settings)
    bootstrap = bootstrap_of(env)
    first = conversation_messages(1, 1)
    run(send_with("aiokafka", env, first))
    assert run(replies_within(env, first, 30.0)), "no reply before the fence"

    async def fence() -> None:  # init_transactions bumps the epoch: the worker's is stale
        for group in range(3):  # Faust's topic groups: the chat topic's is one of them
            successor = AIOKafkaProducer(
                bootstrap_servers=bootstrap,
                transactional_id=f"{env['MARVIN_APP_ID']}-{group}-0",
            )
            await successor.start()
            await successor.stop()

    run(fence())
    fenced_at = time.monotonic()
    run(send_with("aiokafka", env, conversation_messages(1, 1)))
    ready_answers = []
    while worker.process.poll() is None and time.monotonic() - fenced_at < 60:
        if "fatal error" in worker.log_text():
            status, _ = get_or_refused(f"{worker.url}/ready/")
            ready_answers.append(status)
        time.sleep(0.05)
    exited_after = time.monotonic() - fenced_at
    assert worker.process.poll() is not None, (
        f"still running 60 s after the fence:\n{worker.tail()}"
    )
    assert worker.process.returncode != 0
    fatal = [line for line in worker.log_text().splitlines() if "fatal error" in line]
    assert len(fatal) == 1, fatal
    assert 200 not in ready_answers
    print(
        f"\n[fenced] exited {worker.process.returncode} {exited_after:.1f} s after the fence; "
        f"/ready/ answers while stopping: {sorted(set(ready_answers))}"
    )


def get_or_refused(url: str) -> tuple[int, object]:
    try:
        return get(url)
    except OSError:  # the web server is already down
        return 0, None


async def send_with(family: str, env: dict[str, str], sent: list[Sent]) -> None:
    async with ChatProducer(family, bootstrap_of(env), env["MARVIN_TOPIC"]) as producer:
        await producer.send(sent)


async def replies_within(env: dict[str, str], sent: list[Sent], timeout: float) -> bool:
    async with ReplyReader(bootstrap_of(env), env["MARVIN_TOPIC"]) as reader:
        return await reader.wait_for([m.message_id for m in sent], timeout)


def test_the_projects_own_clients_place_keys_with_the_setting(start_worker, worker_env):
    """``marvin-faust say`` with MARVIN_PARTITIONER=crc32 writes where a librdkafka front end
    would, and the view of that conversation is found."""
    from marvin_faust.partitioners import crc32_partitioner, murmur2_partitioner

    settings = {"MARVIN_PARTITIONS": "4", "MARVIN_PARTITIONER": "crc32"}
    worker = start_worker(**settings)
    every = [0, 1, 2, 3]
    cids = []
    while len(cids) < 3:  # conversations the two partitioners place apart
        cid = str(uuid.uuid4())
        if crc32_partitioner(cid.encode(), every, every) != murmur2_partitioner(
            cid.encode(), every, every
        ):
            cids.append(cid)
    env = cli_env({**worker_env, **settings})
    for cid in cids:
        done = say(env, "--timeout", "60", cid, "where am I?")
        assert done.returncode == 0, done.stderr
        assert get(f"{worker.url}/conversations/{cid}/")[0] == 200
    records = run(
        consume(bootstrap_of(env), env["MARVIN_TOPIC"], until=lambda rs: len(rs) >= 2 * len(cids))
    )
    for record in records:
        cid = record.key.decode()
        assert record.partition == crc32_partitioner(record.key, every, every), cid


@pytest.mark.parametrize("fix_7", ["on", "off"])
def test_replies_and_dead_letters_on_other_topics_are_in_the_transaction(
    start_worker, worker_env, fix_7
):
    """A reply topic with another partition count, and the dead-letter topic: what the worker
    writes there commits with the message it answers (fix 7), so a read_committed reader sees
    nothing before the commit. Without fix 7 Faust sends both with no transaction at all
    (faust-streaming/faust#177): this test shows that too. The 30 s commit interval leaves time
    to look before the first commit."""
    from marvin_faust.partitioners import murmur2_partitioner

    reply_topic = f"{worker_env['MARVIN_TOPIC']}-replies"
    run(create_topic(bootstrap_of(worker_env), reply_topic, 3))
    settings = {
        "MARVIN_PARTITIONS": "4",
        "MARVIN_REPLY_TOPIC": reply_topic,
        "MARVIN_COMMIT_INTERVAL": "30",
        "MARVIN_DISABLED_FAUST_FIXES": "7" if fix_7 == "off" else "",
    }
    env = {**worker_env, **settings}
    worker = start_worker(**settings)
    good = conversation_messages(1, 1)
    bad = Sent(good[0].cid, str(uuid.uuid4()), b"{not json", valid=False)
    run(send_with("librdkafka", env, [*good, bad]))
    deadline = time.monotonic() + 20
    while not all(line in worker.log_text() for line in ("Answered", "Dead-lettering")):
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.1)

    def read(topic: str, isolation_level: str, timeout: float) -> list:
        try:
            return run(
                consume(
                    bootstrap_of(env),
                    topic,
                    until=lambda rs: len(rs) >= 1,
                    timeout=timeout,
                    isolation_level=isolation_level,
                )
            )
        except AssertionError:  # timed out with nothing
            return []

    for topic in (reply_topic, env["MARVIN_DEAD_LETTER_TOPIC"]):
        assert read(topic, "read_uncommitted", 10), f"nothing written to {topic}"
        visible = read(topic, "read_committed", 3)
        if fix_7 == "off":  # Faust's own: outside any transaction, visible at once
            assert visible, f"{topic}: in a transaction without fix 7"
            continue
        assert visible == [], f"{topic}: visible before the commit"
    [reply] = read(reply_topic, "read_committed", 60)  # after the commit, once
    assert json.loads(reply.value)["role"] == "AI"
    # The partition counts differ: the reply is keyed with MARVIN_PARTITIONER (murmur2).
    assert reply.partition == murmur2_partitioner(good[0].cid.encode(), [0, 1, 2], [0, 1, 2])
    assert len(read(env["MARVIN_DEAD_LETTER_TOPIC"], "read_committed", 10)) == 1
