"""A middle baseline: the bare loop's hop as a minimal Faust agent (no table, no history).

Same Faust settings as the worker (from ``marvin_faust.settings``: processing guarantee,
commit interval, max poll records, partitions), same raw chat topic, same reply record as
``bench.bare_loop``. Between this and the worker lies what our agent and the history table
cost; between the bare loop and this, what Faust itself costs.

Run as ``faust -A bench.faust_loop worker -l info`` with the worker's ``MARVIN_*`` variables;
``MARVIN_STANDIN_LATENCY`` is the "model" time.
"""

from __future__ import annotations

import asyncio
from typing import Any

import faust

from marvin_faust.settings import load_settings

from .bare_loop import reply_to

settings = load_settings()

app = faust.App(
    f"{settings.app_id}-faust-loop",
    broker=settings.broker,
    store="memory://",
    datadir=str(settings.data_dir),
    web_enabled=False,
    topic_partitions=settings.partitions,
    processing_guarantee=settings.processing_guarantee,
    broker_commit_interval=settings.commit_interval,
    broker_max_poll_records=settings.max_poll_records,
)

chat_topic = app.topic(
    settings.topic,
    key_type=bytes,
    value_type=bytes,
    key_serializer="raw",
    value_serializer="raw",
    partitions=settings.partitions,
)


@app.agent(chat_topic)
async def echo(stream: Any) -> None:
    async for event in stream.events():
        reply = reply_to(event.message)
        if reply is None:
            continue
        if settings.standin_latency:
            await asyncio.sleep(settings.standin_latency)
        value, headers = reply
        await chat_topic.send(key=event.message.key, value=value, headers=headers)
