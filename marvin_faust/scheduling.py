"""Several jobs at once, one key's jobs strictly in order: how the agent answers several
conversations at once (pure asyncio, no Faust, no Kafka).

:func:`run_keyed` reads items from an async iterator and runs ``handle(item)`` for up to
``limit`` items at once. Items with the same key (a conversation) run one after the other, in the
order they were read; items with different keys overlap. It takes the next item only when a slot
is free, so no more than ``limit`` items are ever taken and unfinished: a rebalance or a stop
waits for at most that many. Results are yielded as jobs finish, which is not the order they
were read in; the caller acknowledges each item when its job is done (Faust commits an offset
only when every offset before it on its partition is acknowledged).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


async def run_keyed(
    items: AsyncIterator[Item],
    key: Callable[[Item], Hashable],
    handle: Callable[[Item], Awaitable[Result]],
    limit: int,
) -> AsyncIterator[Result]:
    """Yield ``handle(item)`` of every item as it finishes; see the module docstring.

    A job that raises ends the iteration with its exception (after cancelling the others):
    ``handle`` is expected to deal with its own failures. When ``items`` ends, the jobs still
    running are awaited and their results yielded.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    slots = asyncio.Semaphore(limit)
    finished: asyncio.Queue[asyncio.Task[Result]] = asyncio.Queue()
    last_of_key: dict[Hashable, asyncio.Task[Result]] = {}
    running: set[asyncio.Task[Result]] = set()

    async def job(item: Item, item_key: Hashable, before: asyncio.Task[Result] | None) -> Result:
        try:
            if before is not None:
                # Order within a key; the earlier job's own failure is reported by that job.
                await asyncio.wait([before])
            return await handle(item)
        finally:
            slots.release()
            if last_of_key.get(item_key) is asyncio.current_task():
                del last_of_key[item_key]

    def on_done(task: asyncio.Task[Result]) -> None:
        running.discard(task)
        finished.put_nowait(task)

    async def read() -> None:
        await slots.acquire()
        async for item in items:
            item_key = key(item)
            # Created here, so the job's context holds what the iterator set for this item
            # (Faust's current event: what the job sends joins that event's transaction).
            task = asyncio.create_task(job(item, item_key, last_of_key.get(item_key)))
            last_of_key[item_key] = task
            running.add(task)
            task.add_done_callback(on_done)
            await slots.acquire()

    reader = asyncio.create_task(read())
    try:
        while True:
            next_done = asyncio.create_task(finished.get())
            await asyncio.wait({next_done, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not next_done.done():
                next_done.cancel()
                reader.result()  # the reader failed: raise; or the items ended
                break
            yield next_done.result().result()
        while running or not finished.empty():
            yield (await finished.get()).result()
    finally:
        reader.cancel()
        for task in list(running):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(reader, *running, return_exceptions=True)
