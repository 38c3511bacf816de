"""The web chat: a browser front end that reaches the LLM only through Kafka.

Started by ``marvin-faust webchat [--port 8080] [--bind 127.0.0.1]``, as a process of its own.

Why a separate process, not more views on the Faust worker: the product is two services joined
only by Kafka (see the README). A worker is busy with the model (seconds of CPU per reply), is
restarted, rebalanced and scaled by partitions, and owns only some conversations; the front end
holds long-lived browser connections and must stay up while workers come and go. Kept apart, each
scales and fails alone: a page stays open while every worker restarts (its messages wait in the
topic), and the front end can be swapped for any other producer of the wire format. The only
other thing the web chat reads is a worker's conversation view, for the history of a reopened
page; a worker is not needed for anything else.

Routes:

- ``GET /``, ``GET /c/{id}``: the page (``static/index.html``); ``/?c={id}`` works too;
- ``POST /api/conversations``: open a conversation with Marvin's greeting; returns its id;
- ``POST /api/conversations/{id}/messages`` ``{"text": ...}``: produce the human record;
- ``GET /api/conversations/{id}/events``: server-sent events, one ``reply`` per AI record of the
  conversation as it arrives on Kafka, and one ``chunk`` per piece of a reply being written
  (the stream topic, ``marvin_faust.streaming``); a ``ready`` event first, once the page is
  subscribed;
- ``GET /api/conversations/{id}/history``: the stored history, from the worker's
  ``/conversations/{id}/`` view (with ``MARVIN_API_TOKEN`` as a bearer token when set).

Every route with a conversation id answers 400 when the id is not a valid one
(``models.conversation_id_problem``): an id such as ``x%3Flimit=1`` or ``..%2Fhealth`` would
otherwise reach other paths of the worker with the bearer token attached. The id is also quoted
where it goes into the worker's URL.

One Kafka consumer per process (``ChatClient``'s, with no group, positioned at the end when the
process starts) reads the reply topic and the stream topic and fans each AI record and chunk out
to the open pages of its conversation. The page grows a reply's bubble chunk by chunk, starts it
over when a stream restarts (a worker crashed mid-reply and the message was redelivered), and
settles it on the final reply, the record of truth. Everything the model says is rendered with
``textContent`` by ``static/chat.js``, and the page's Content-Security-Policy allows no inline
script.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from .client import ChatClient, ChatClientError, Reply
from .models import ChatMessage, conversation_id_problem
from .settings import Settings
from .streaming import StreamChunk

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
# Path segment(s) of a conversation id: anything, so that an id with a '/' is refused with a
# 400 that says why (``checked_conversation_ids``) rather than a bare 404.
CONVERSATION_ID = r".+"
HEARTBEAT_SECONDS = 15.0  # an SSE comment this often finds closed connections
# Replies and chunks buffered for one slow page; the history covers a dropped reply.
SUBSCRIBER_QUEUE = 1000
HISTORY_TIMEOUT = aiohttp.ClientTimeout(total=15)
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

CLIENT: web.AppKey[ChatClient] = web.AppKey("client", ChatClient)
SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
HTTP: web.AppKey[aiohttp.ClientSession] = web.AppKey("http", aiohttp.ClientSession)


Event = Reply | StreamChunk


class ReplyHub:
    """Fans the replies and stream chunks read by one ``ChatClient`` out to per-conversation
    subscribers."""

    def __init__(self, client: ChatClient) -> None:
        self.client = client
        self._subscribers: dict[str, set[asyncio.Queue[Event | None]]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webchat-replies")

    async def stop(self) -> None:
        for queues in self._subscribers.values():
            for queue in queues:  # ends every open event stream
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def subscribe(self, conversation_id: str) -> Iterator[asyncio.Queue[Event | None]]:
        queue: asyncio.Queue[Event | None] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers[conversation_id].add(queue)
        try:
            yield queue
        finally:
            self._subscribers[conversation_id].discard(queue)
            if not self._subscribers[conversation_id]:
                del self._subscribers[conversation_id]

    def subscribers(self, conversation_id: str) -> int:
        return len(self._subscribers.get(conversation_id, ()))

    async def _run(self) -> None:
        while True:
            try:
                async for event in self.client.events():
                    self._publish(event)
            except asyncio.CancelledError:
                raise
            except Exception:  # the consumer recovers on its own; keep the fan-out alive
                log.exception("Reading replies failed; retrying")
                await asyncio.sleep(1.0)

    def _publish(self, event: Event) -> None:
        conversation_id = (
            event.conversation_id
            if isinstance(event, StreamChunk)
            else event.message.conversation_id
        )
        for queue in self._subscribers.get(conversation_id, ()):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("Dropped an event for a slow page of %s", conversation_id)


HUB: web.AppKey[ReplyHub] = web.AppKey("hub", ReplyHub)


def turn_json(
    role: str, text: str, timestamp: int, settings: Settings, **extra: Any
) -> dict[str, Any]:
    """One turn as the page shows it. ``key`` identifies a turn across the event stream and the
    stored history (both carry the record's Timestamp); the timestamp goes as a string, since
    nanoseconds do not fit in a JavaScript number."""
    return {
        "key": f"{role}:{timestamp}",
        "role": "ai" if role == settings.ai_role else "human",
        "text": text,
        "timestamp": str(timestamp),
        **extra,
    }


def message_json(message: ChatMessage, settings: Settings, **extra: Any) -> dict[str, Any]:
    return turn_json(message.role, message.text, message.Timestamp, settings, **extra)


def chunk_json(chunk: StreamChunk) -> dict[str, Any]:
    """A piece of a reply being written, as the page grows it."""
    return {
        "in_reply_to": chunk.in_reply_to,
        "stream_id": chunk.stream_id,
        "index": chunk.index,
        "delta": chunk.delta,
        "done": chunk.done,
        "finish_reason": chunk.finish_reason,
    }


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def refusal(conversation_id: str | None) -> web.Response | None:
    """A 400 for an invalid conversation id; None for a valid one or none."""
    problem = None if conversation_id is None else conversation_id_problem(conversation_id)
    return None if problem is None else error(400, f"invalid conversation id: {problem}")


async def page(request: web.Request) -> web.StreamResponse:
    refused = refusal(request.query.get("c"))  # /?c={id}; /c/{id} is checked by the middleware
    if refused is not None:
        return refused
    return web.FileResponse(STATIC_DIR / "index.html", headers=SECURITY_HEADERS)


async def open_conversation(request: web.Request) -> web.Response:
    client, settings = request.app[CLIENT], request.app[SETTINGS]
    try:
        greeting = await client.greet()
    except ChatClientError as exc:
        return error(503, str(exc))
    return web.json_response(
        {
            "conversation_id": greeting.conversation_id,
            "greeting": message_json(greeting, settings),
        },
        status=201,
    )


async def post_message(request: web.Request) -> web.Response:
    client, settings = request.app[CLIENT], request.app[SETTINGS]
    conversation_id = request.match_info["conversation_id"]
    # A JSON body only: a cross-site form cannot send one without a CORS preflight.
    if request.content_type != "application/json":
        return error(415, 'send JSON: {"text": ...}')
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return error(400, "the body is not JSON")
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text.strip():
        return error(400, "text must be a non-empty string")
    if len(text) > settings.max_text_chars:
        return error(
            400, f"text has {len(text)} characters, the limit is {settings.max_text_chars}"
        )
    try:
        message, message_id = await client.post(conversation_id, text)
    except ChatClientError as exc:
        return error(503, str(exc))
    return web.json_response(
        {"message_id": message_id, "turn": message_json(message, settings)}, status=202
    )


async def events(request: web.Request) -> web.StreamResponse:
    hub, settings = request.app[HUB], request.app[SETTINGS]
    conversation_id = request.match_info["conversation_id"]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # no proxy buffering of the stream
        }
    )
    await response.prepare(request)
    with hub.subscribe(conversation_id) as queue:
        try:
            # The page sends nothing before this: no reply can come before the subscription.
            await response.write(sse("ready", {"conversation_id": conversation_id}))
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if event is None:  # the server is shutting down
                    break
                if isinstance(event, StreamChunk):
                    await response.write(sse("chunk", chunk_json(event)))
                    continue
                data = message_json(
                    event.message,
                    settings,
                    message_id=event.message_id,
                    in_reply_to=event.in_reply_to,
                )
                await response.write(sse("reply", data))
        except (ConnectionResetError, ConnectionError):
            pass  # the page went away
    return response


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def history(request: web.Request) -> web.Response:
    settings, http = request.app[SETTINGS], request.app[HTTP]
    conversation_id = request.match_info["conversation_id"]
    # The id is valid (checked_conversation_ids), so quoting changes nothing; it keeps the path
    # one segment should the rule ever change.
    url = f"{settings.worker_url.rstrip('/')}/conversations/{quote(conversation_id, safe='')}/"
    headers = {"Authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}
    try:
        async with http.get(url, headers=headers) as response:
            status = response.status
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return error(
            502, f"cannot read the history from the worker at {settings.worker_url}: {exc}"
        )
    if status == 404:
        return error(404, f"no conversation {conversation_id!r} (yet)")
    if status != 200 or not isinstance(body, dict):
        reason = body.get("error") if isinstance(body, dict) else None
        return error(502, f"the worker answered {status}: {reason or 'unexpected reply'}")
    turns = [
        turn_json(t["role"], t["text"], t["timestamp"], settings, message_id=t.get("message_id"))
        for t in body.get("turns", [])
    ]
    return web.json_response({"conversation_id": conversation_id, "turns": turns})


@web.middleware
async def security_headers(request: web.Request, handler: Any) -> web.StreamResponse:
    response = await handler(request)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


@web.middleware
async def checked_conversation_ids(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every route with a conversation id in its path takes only valid ones."""
    refused = refusal(request.match_info.get("conversation_id"))
    return refused if refused is not None else await handler(request)


def create_webchat(settings: Settings) -> web.Application:
    """The aiohttp application; Kafka and HTTP clients start with it and stop with it."""
    app = web.Application(middlewares=[security_headers, checked_conversation_ids])
    app[SETTINGS] = settings
    cid = "{conversation_id:" + CONVERSATION_ID + "}"
    app.router.add_get("/", page)
    app.router.add_get(f"/c/{cid}", page)
    app.router.add_post("/api/conversations", open_conversation)
    app.router.add_post(f"/api/conversations/{cid}/messages", post_message)
    app.router.add_get(f"/api/conversations/{cid}/events", events)
    app.router.add_get(f"/api/conversations/{cid}/history", history)
    app.router.add_static("/static/", STATIC_DIR)
    app.cleanup_ctx.append(_clients)
    app.on_shutdown.append(_end_streams)
    return app


async def _clients(app: web.Application) -> Any:
    client = ChatClient(app[SETTINGS], stream=True)
    await client.__aenter__()  # raises ChatClientError when Kafka or the topic is missing
    hub = ReplyHub(client)
    hub.start()
    app[CLIENT], app[HUB] = client, hub
    app[HTTP] = aiohttp.ClientSession(timeout=HISTORY_TIMEOUT)
    try:
        yield
    finally:
        await hub.stop()
        await app[HTTP].close()
        await client.__aexit__(None, None, None)


async def _end_streams(app: web.Application) -> None:
    await app[HUB].stop()


async def serve(settings: Settings, bind: str, port: int) -> None:
    """Run the web chat until cancelled (the CLI's worker cancels it on SIGINT/SIGTERM)."""
    runner = web.AppRunner(create_webchat(settings), shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, bind, port)
        await site.start()
        log.info("Web chat on http://%s:%d/", bind, port)
        print(f"marvin-faust webchat: http://{bind}:{port}/", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
