"""HTTP views on the Faust web server (bound to 127.0.0.1 unless configured).

- ``GET /conversations/{id}/[?limit=N]``: the stored history, JSON; routed by ``table_route`` to
  the worker that owns the key's partition. Requires ``Authorization: Bearer <token>`` when
  ``MARVIN_API_TOKEN`` is set; an invalid id (``models.conversation_id_problem``) gets 400
  before it is routed anywhere.
- ``DELETE /conversations/{id}/``: delete it, the way ``marvin-faust forget`` does (forget
  records on the chat topic, ``marvin_faust.lifecycle``); guarded, checked and routed the same
  way.
- ``GET /health/``: liveness. ``GET /ready/``: readiness (tables recovered, model loaded).
- ``GET /metrics``: Prometheus text (set up in ``app.py``).
- ``GET /``: Faust's production index, ``{"status": "OK"}``.

Faust's built-in ``/table/...`` and ``/router/...`` routes are switched off in ``app.py``: the
first serves every conversation, the second every worker's URL and partitions, both with no
authentication. ``tests/e2e/test_views.py`` checks that these are all the routes there are.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import TYPE_CHECKING, Any

from faust.web import Request, Response, View

from .models import conversation_id_problem

if TYPE_CHECKING:
    from .app import MarvinApp

Handler = Callable[..., Awaitable[Response]]

# Seconds a DELETE waits for the deletion to be applied before it answers 202.
FORGET_WAIT = 10.0


def require_token(token: str | None) -> Callable[[Handler], Handler]:
    """401 unless the request carries ``token`` as a bearer token (compared in constant time);
    no check when ``token`` is None."""

    def decorate(handler: Handler) -> Handler:
        @wraps(handler)
        async def guarded(view: View, request: Request, **kwargs: Any) -> Response:
            if token is not None:
                given = request.headers.get("Authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                    return view.json(
                        {"error": "missing or wrong bearer token"},
                        status=401,
                        headers={"WWW-Authenticate": 'Bearer realm="marvin-faust"'},
                    )
            return await handler(view, request, **kwargs)

        return guarded

    return decorate


def valid_conversation_id(match_info: str) -> Callable[[Handler], Handler]:
    """400 when the path's ``match_info`` is not a valid conversation id."""

    def decorate(handler: Handler) -> Handler:
        @wraps(handler)
        async def checked(view: View, request: Request, **kwargs: Any) -> Response:
            problem = conversation_id_problem(request.match_info[match_info])
            if problem is not None:
                return view.json({"error": f"invalid conversation id: {problem}"}, status=400)
            return await handler(view, request, **kwargs)

        return checked

    return decorate


def parse_limit(raw: str | None) -> int | None:
    """``?limit=N``: a positive whole number, or absent. Raises ValueError with the reason."""
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"limit must be a positive whole number, got {raw!r}")
    return int(raw)


def declare_views(app: MarvinApp) -> None:
    history, backend = app.history, app.backend

    @require_token(app.settings.api_token)
    @valid_conversation_id("conversation_id")  # before table_route sends it to another worker
    @app.table_route(table=history, match_info="conversation_id")
    async def conversation(view: View, request: Request, conversation_id: str) -> Response:
        try:
            limit = parse_limit(request.query.get("limit"))
        except ValueError as exc:
            return view.json({"error": str(exc)}, status=400)
        turns = history[conversation_id]
        if not turns:
            return view.json({"error": f"no conversation {conversation_id!r}"}, status=404)
        shown = turns[-limit:] if limit else turns
        return view.json(
            {"conversation_id": conversation_id, "total_turns": len(turns), "turns": shown}
        )

    @require_token(app.settings.api_token)
    @valid_conversation_id("conversation_id")
    @app.table_route(table=history, match_info="conversation_id")
    async def forget(view: View, request: Request, conversation_id: str) -> Response:
        """200 once this worker's agent deleted it, 202 if not within FORGET_WAIT (it waits
        behind the conversation's messages), 404 if nothing is stored under the id here. The
        forget records go out in every case: a part written by another partitioner lives on
        another partition."""
        stored = bool(history[conversation_id])
        deleted = await app.lifecycle.forget(conversation_id, wait=FORGET_WAIT)
        if not stored:
            return view.json({"error": f"no conversation {conversation_id!r}"}, status=404)
        return view.json(
            {"conversation_id": conversation_id, "deleted": deleted}, status=200 if deleted else 202
        )

    app.page("/conversations/{conversation_id}/")(
        type("conversation", (View,), {"get": conversation, "delete": forget})
    )

    @app.page("/health/")
    async def health(view: View, request: Request) -> Response:
        return view.json({"status": "ok"})

    @app.page("/ready/")
    async def ready(view: View, request: Request) -> Response:
        if app.crashed:  # stopping after a fatal error: send traffic elsewhere
            return view.json({"status": "crashed", "reason": repr(app.crash_reason)}, status=503)
        waiting = []
        if not app.tables.recovery.completed.is_set():
            waiting.append("table recovery")
        if not backend.loaded:
            waiting.append("model")
        if waiting:
            return view.json({"status": "starting", "waiting_for": waiting}, status=503)
        return view.json({"status": "ready", "backend": backend.name})

    @app.task
    async def load_routing_metadata() -> None:
        """Give table_route the changelog's partitions before the first request.

        table_route hashes a key with the app producer's metadata. Under exactly_once that
        producer never writes the changelog (transactional producers do), so it would not know
        the topic and every routed request would fail with a TypeError. Ask for the partitions
        once; aiokafka keeps them fresh from then on. (Faust offers no public call for this.)
        """
        producer = app.producer._ensure_producer()
        await producer.partitions_for(history.changelog_topic.get_topic_name())
