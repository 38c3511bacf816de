"""A minimal Faust app for tests/e2e/test_broker.py: an agent forwards topic IN to topic OUT.

Run as ``faust -A tests.e2e.faust_roundtrip_app worker``, configured by the environment:
ROUNDTRIP_BOOTSTRAP, ROUNDTRIP_APP_ID, ROUNDTRIP_IN, ROUNDTRIP_OUT, ROUNDTRIP_DATADIR.
"""

from __future__ import annotations

import os

import faust

PREFIX = b"forwarded:"

app = faust.App(
    os.environ.get("ROUNDTRIP_APP_ID", "marvin-roundtrip"),
    broker="kafka://" + os.environ.get("ROUNDTRIP_BOOTSTRAP", "127.0.0.1:9092"),
    store="memory://",
    web_enabled=False,
    datadir=os.environ.get("ROUNDTRIP_DATADIR", "roundtrip-data"),
    topic_partitions=1,
)

source = app.topic(
    os.environ.get("ROUNDTRIP_IN", "roundtrip-in"), key_serializer="raw", value_serializer="raw"
)
sink = app.topic(
    os.environ.get("ROUNDTRIP_OUT", "roundtrip-out"), key_serializer="raw", value_serializer="raw"
)


@app.agent(source)
async def forward(stream):
    async for event in stream.events():
        await sink.send(key=event.key, value=PREFIX + event.value)
