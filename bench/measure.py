"""The measurements that need only the driver: round-trip latency and throughput.

Both run against whatever answers the topic (a worker or the bare loop), so the two figures
of a pair come from the same code path on the client side.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

from hdrh.histogram import HdrHistogram

from .driver import Driver

# Microseconds, 1 us to 10 min, 3 significant digits.
HIST_LOWEST_US, HIST_HIGHEST_US, HIST_DIGITS = 1, 600_000_000, 3
PERCENTILES = (50.0, 95.0, 99.0)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(HIST_LOWEST_US, HIST_HIGHEST_US, HIST_DIGITS)


def summarize_ms(histogram: HdrHistogram) -> dict[str, float]:
    """p50/p95/p99/max/mean in milliseconds from a histogram of microseconds."""
    out = {f"p{p:g}": histogram.get_value_at_percentile(p) / 1000.0 for p in PERCENTILES}
    out["max"] = histogram.get_max_value() / 1000.0
    out["mean"] = round(histogram.get_mean_value() / 1000.0, 3)
    out["count"] = histogram.get_total_count()
    return out


def conversation_ids(count: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(count)]


@dataclass
class LatencyResult:
    latency_ms: dict[str, float]
    overhead_ms: dict[str, float]
    messages: int
    conversations: int
    concurrency: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "conversations": self.conversations,
            "concurrency": self.concurrency,
            "wall_seconds": round(self.seconds, 2),
            "latency_ms": self.latency_ms,
            "overhead_ms": self.overhead_ms,
        }


async def warm_up(driver: Driver, count: int = 20, timeout: float = 120.0) -> None:
    """A few round trips on a conversation of their own: connections, assignment, caches."""
    cid = str(uuid.uuid4())
    for index in range(count):
        await driver.ask(cid, f"warm-up {index}", timeout=timeout)


async def latency(
    bootstrap: str,
    topic: str,
    *,
    messages: int,
    conversations: int,
    concurrency: int,
    model_seconds: float,
    isolation_level: str = "read_uncommitted",
    family: str = "aiokafka",
) -> LatencyResult:
    """Round trips, each waiting for its own reply; at most ``concurrency`` in flight.

    Message ``i`` goes to conversation ``i % conversations``; with ``concurrency`` at most the
    number of conversations, no conversation has two messages in flight, as with a person
    typing. Overhead = round trip - ``model_seconds`` (the stand-in's fixed latency).
    """
    cids = conversation_ids(conversations)
    round_trips, overheads = new_histogram(), new_histogram()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(messages):
        queue.put_nowait(index)
    model_us = model_seconds * 1e6

    async def client(driver: Driver) -> None:
        while not queue.empty():
            index = queue.get_nowait()
            cid = cids[index % conversations]
            reply = await driver.ask(cid, f"message {index // conversations} of {cid[:8]}")
            micros = reply.seconds * 1e6
            round_trips.record_value(max(1, round(micros)))
            overheads.record_value(max(1, round(micros - model_us)))

    async with Driver(bootstrap, topic, isolation_level=isolation_level, family=family) as driver:
        await warm_up(driver)
        started = time.perf_counter()
        await asyncio.gather(*(client(driver) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return LatencyResult(
        latency_ms=summarize_ms(round_trips),
        overhead_ms=summarize_ms(overheads),
        messages=messages,
        conversations=conversations,
        concurrency=concurrency,
        seconds=elapsed,
    )


@dataclass
class ThroughputResult:
    messages: int
    conversations: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "conversations": self.conversations,
            "seconds": round(self.seconds, 3),
            "messages_per_second": round(self.per_second, 1),
        }


async def throughput(
    bootstrap: str,
    topic: str,
    *,
    messages: int,
    conversations: int,
    timeout: float = 900.0,
    family: str = "aiokafka",
) -> ThroughputResult:
    """Produce ``messages`` human records as fast as the producer takes them (round-robin over
    ``conversations``), then wait for every reply; messages/s = messages / (last reply - first
    send). The producer outruns one worker, so this is the worker's (or the loop's) rate.
    """
    cids = conversation_ids(conversations)
    async with Driver(bootstrap, topic, family=family) as driver:
        await warm_up(driver, count=5)
        started = time.perf_counter()
        futures = [
            await driver.send(cids[index % conversations], f"message {index}")
            for index in range(messages)
        ]
        await driver.flush()
        replies = await asyncio.wait_for(asyncio.gather(*futures), timeout)
        finished = max(reply.received_at for reply in replies)
    return ThroughputResult(
        messages=messages, conversations=conversations, seconds=finished - started
    )
