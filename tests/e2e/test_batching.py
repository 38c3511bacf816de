"""Several conversations at once on the real model: a real worker on the real broker decodes
``MARVIN_PARALLEL`` replies together and reuses a conversation's KV cache on its next turn."""

from __future__ import annotations

import json
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from marvin_faust.models import Forget, make_forget
from marvin_faust.testing.kafka import bootstrap_of, consume, produce, replies_for, run, wire_value

pytestmark = [pytest.mark.kafka, pytest.mark.model]

REAL_MODEL = {
    "MARVIN_BACKEND": "llamacpp",
    "MARVIN_MAX_TOKENS": "60",
    "MARVIN_SEED": "7",
    "MARVIN_PARALLEL": "4",
}


def prompt_tokens(worker_url: str) -> dict[str, float]:
    """``marvin_model_prompt_tokens_total`` by cache (evaluated, reused) from ``/metrics``."""
    with urllib.request.urlopen(f"{worker_url}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        sample.labels["cache"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "marvin_model_prompt_tokens_total"
    }


def send_and_wait(env: dict, messages: list[tuple[str, str]], replies: int = 1) -> list:
    """Send ``(cid, text)`` human messages at once; the chat topic once each conversation has
    ``replies`` replies."""
    bootstrap, topic = bootstrap_of(env), env["MARVIN_TOPIC"]
    records = [
        (cid.encode(), wire_value(cid, text), [("uuid", str(uuid.uuid4()).encode())])
        for cid, text in messages
    ]
    run(produce(bootstrap, topic, records))
    cids = {cid for cid, _ in messages}
    return run(
        consume(
            bootstrap,
            topic,
            until=lambda rs: all(len(replies_for(rs, cid)) >= replies for cid in cids),
            timeout=300,
        )
    )


def test_four_conversations_are_answered_together(start_worker, worker_env):
    env = {**worker_env, **REAL_MODEL}
    start_worker(**env)
    cids = [str(uuid.uuid4()) for _ in range(4)]
    topics = ("a robot", "the sea", "a lighthouse", "a small moon")
    stories = [f"Tell me a long story about {topic}." for topic in topics]
    records = send_and_wait(env, list(zip(cids, stories, strict=True)))
    assert all(len(replies_for(records, cid)) == 1 for cid in cids)

    # When each reply's stream began and ended (the producer's timestamps): all four began
    # before any ended, so the worker was writing four replies at once.
    chunks = run(
        consume(
            bootstrap_of(env),
            f"{env['MARVIN_TOPIC']}-stream",
            until=lambda rs: sum(json.loads(r.value)["done"] for r in rs) >= 4,
        )
    )
    began: dict[str, int] = {}
    ended: dict[str, int] = {}
    for record in chunks:
        chunk = json.loads(record.value)
        began.setdefault(chunk["conversation_id"], record.timestamp)
        if chunk["done"]:
            ended[chunk["conversation_id"]] = record.timestamp
    assert set(began) == set(ended) == set(cids)
    assert max(began.values()) <= min(ended.values()), (began, ended)


def test_a_conversations_next_turn_reuses_its_kv_cache(start_worker, worker_env):
    env = {**worker_env, **REAL_MODEL}
    worker = start_worker(**env)
    cid = str(uuid.uuid4())
    send_and_wait(env, [(cid, "Hello Marvin, who are you?")])
    before = prompt_tokens(worker.url)
    send_and_wait(env, [(cid, "And what do you do all day?")], replies=2)
    after = prompt_tokens(worker.url)
    reused = after["reused"] - before["reused"]
    evaluated = after["evaluated"] - before["evaluated"]
    # The persona and the first exchange came from the cache, only the rest was evaluated.
    assert reused > 0 and evaluated > 0, (before, after)
    assert reused > evaluated, (reused, evaluated)


def test_a_forgotten_conversation_leaves_nothing_in_the_kv_cache(start_worker, worker_env):
    """After a forget record, the conversation's next turn reuses nothing: without the forget
    it would reuse at least the persona from its slot (the test above)."""
    env = {**worker_env, **REAL_MODEL}
    worker = start_worker(**env)
    cid = str(uuid.uuid4())
    send_and_wait(env, [(cid, "Hello Marvin, who are you?")])
    before = prompt_tokens(worker.url)
    # Keyed like the messages, so on their partition and applied in order before the next.
    forget = (cid.encode(), make_forget(cid).to_bytes(), Forget.headers(str(uuid.uuid4())))
    run(produce(bootstrap_of(env), env["MARVIN_TOPIC"], [forget]))
    send_and_wait(env, [(cid, "And what do you do all day?")], replies=2)
    after = prompt_tokens(worker.url)
    assert after["reused"] == before["reused"], (before, after)
    assert after["evaluated"] > before["evaluated"], (before, after)
