"""run_keyed: several jobs at once, one key's jobs in order, never more than the limit taken."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from marvin_faust.scheduling import run_keyed


async def feed(items: list[tuple[str, float]], taken: list[int]) -> AsyncIterator:
    for index, (key, seconds) in enumerate(items):
        taken.append(index)
        yield index, key, seconds


class Recorder:
    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.log: list[tuple[str, int]] = []

    async def handle(self, item: tuple[int, str, float]) -> int:
        index, _, seconds = item
        self.running += 1
        self.most = max(self.most, self.running)
        self.log.append(("start", index))
        await asyncio.sleep(seconds)
        self.log.append(("end", index))
        self.running -= 1
        return index


async def collect(items, limit: int, recorder: Recorder, taken: list[int]) -> list[int]:
    return [
        result
        async for result in run_keyed(
            feed(items, taken), key=lambda item: item[1], handle=recorder.handle, limit=limit
        )
    ]


async def test_different_keys_overlap_up_to_the_limit_and_finish_in_their_own_time():
    recorder, taken = Recorder(), []
    items = [("a", 0.3), ("b", 0.1), ("c", 0.2), ("d", 0.05)]
    results = await collect(items, limit=3, recorder=recorder, taken=taken)
    assert recorder.most == 3
    assert sorted(results) == [0, 1, 2, 3]
    assert results[0] == 1  # the short one first, not the order they were read in
    assert results[-1] == 0


async def test_one_keys_items_run_one_after_the_other_in_order():
    recorder, taken = Recorder(), []
    items = [("a", 0.1), ("a", 0.01), ("b", 0.01), ("a", 0.01)]
    results = await collect(items, limit=4, recorder=recorder, taken=taken)
    a_events = [event for event in recorder.log if event[1] in (0, 1, 3)]
    assert a_events == [(step, i) for i in (0, 1, 3) for step in ("start", "end")]
    assert results.index(2) < results.index(0)  # b did not wait for a


async def test_no_more_items_are_taken_than_can_run():
    recorder, taken = Recorder(), []
    items = [("a", 0.05), *((key, 0.3) for key in "bcdef")]
    scheduled = run_keyed(
        feed(items, taken), key=lambda item: item[1], handle=recorder.handle, limit=2
    )
    first = await anext(scheduled)
    # Two ran, the short one finished: a third was taken; the rest wait in the source.
    assert first == 0
    await asyncio.sleep(0.01)
    assert len(taken) == 3
    assert recorder.most == 2
    rest = [result async for result in scheduled]
    assert sorted([first, *rest]) == list(range(6))


async def test_limit_one_is_strictly_sequential():
    recorder, taken = Recorder(), []
    items = [("a", 0.02), ("b", 0.01), ("c", 0.0)]
    assert await collect(items, limit=1, recorder=recorder, taken=taken) == [0, 1, 2]
    assert recorder.most == 1


async def test_a_failing_job_ends_the_iteration_and_cancels_the_others():
    cancelled = asyncio.Event()

    async def handle(item: tuple[int, str, float]) -> int:
        index = item[0]
        if index == 1:
            raise RuntimeError("boom")
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return index

    taken: list[int] = []
    with pytest.raises(RuntimeError, match="boom"):
        async for _ in run_keyed(
            feed([("a", 0), ("b", 0)], taken), key=lambda i: i[1], handle=handle, limit=2
        ):
            pass
    assert cancelled.is_set()


async def test_a_limit_below_one_is_refused():
    with pytest.raises(ValueError, match="limit must be at least 1"):
        await anext(run_keyed(feed([], []), key=lambda i: i, handle=asyncio.sleep, limit=0))
