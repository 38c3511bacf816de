"""The record on the ``chat`` topic, wire-compatible with the existing producers.

Value (JSON)::

    {"uuid": "<conversation id>", "role": "human", "text": "Hello",
     "conversation_id": "<conversation id>", "Timestamp": 1700000000000000000}

Key: the conversation id. Optional header ``uuid``: a per-message id. ``Timestamp`` is nanoseconds
since the epoch and keeps its capital T. Extra fields are tolerated and dropped.

The agent reads the topic as raw bytes and validates here, inside a try: a Faust value type on
the topic would crash the agent on the first value that fails to deserialize.

A *forget* record asks the worker to delete a conversation's history. It travels on the chat
topic, keyed by the conversation id, so that it lands on the partition of that conversation's
messages and is applied in order with them, inside the worker's transaction. What marks it is
the header ``marvin-control: forget``; its value keeps the chat record's shape with role
``control`` (so readers that keep role ``AI`` or ``human`` pass over it, and a worker that
predates it dead-letters it as an unknown role)::

    {"uuid": "<id>", "role": "control", "text": "forget", "conversation_id": "<id>",
     "Timestamp": 1700000000000000000, "reason": "request"}

``reason`` is ``request`` (``marvin-faust forget``, ``DELETE /conversations/{id}/``) or
``expired`` (the worker's own sweep), which adds ``idle_since``: the newest turn's timestamp as
the sweep saw it. An expiry deletes only if that is still the newest turn.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import faust

MESSAGE_ID_HEADER = "uuid"
IN_REPLY_TO_HEADER = "in-reply-to"
CONTROL_HEADER = "marvin-control"
FORGET = "forget"  # the one control so far: the header's value
CONTROL_ROLE = "control"

# A conversation id becomes a URL path segment (the worker's view, the web chat's routes) and a
# table key: ASCII letters, digits, '-', '_' and '.', not starting with '.', so that no id can
# be '..', carry a '/', '?', '#', '%' or a space, or change the meaning of a URL. uuid4 strings,
# what the front ends make, are 36 of these characters.
CONVERSATION_ID_MAX_CHARS = 128
_CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class ChatMessage(faust.Record, serializer="json", include_metadata=False):
    uuid: str
    role: str
    text: str
    conversation_id: str
    Timestamp: int

    def to_bytes(self) -> bytes:
        return json.dumps(self.asdict(), ensure_ascii=False, separators=(",", ":")).encode()


class BadMessage(ValueError):
    """A record that cannot be answered; ``str(exc)`` is the reason sent with it."""


_REQUIRED: dict[str, type] = {
    "uuid": str,
    "role": str,
    "text": str,
    "conversation_id": str,
    "Timestamp": int,
}


def now_ns() -> int:
    return time.time_ns()


def new_message_id() -> str:
    return str(uuid.uuid4())


def conversation_id_problem(conversation_id: str) -> str | None:
    """Why ``conversation_id`` is not a valid conversation id, or None when it is.

    The one definition of a valid id, used by every entry point: the agent (a record with a bad
    id is dead-lettered with this reason), the worker's view and the web chat (400), the CLI.
    """
    if not conversation_id:
        return "empty conversation_id"
    if len(conversation_id) > CONVERSATION_ID_MAX_CHARS:
        return (
            f"conversation_id has {len(conversation_id)} characters, "
            f"the limit is {CONVERSATION_ID_MAX_CHARS}"
        )
    if not _CONVERSATION_ID.fullmatch(conversation_id):
        return (
            f"conversation_id {conversation_id!r} may only hold ASCII letters, digits, "
            "'-', '_' and '.' (not first)"
        )
    return None


def make_message(conversation_id: str, role: str, text: str) -> ChatMessage:
    return ChatMessage(
        uuid=conversation_id,
        role=role,
        text=text,
        conversation_id=conversation_id,
        Timestamp=now_ns(),
    )


def parse_chat_message(value: bytes | None, *, max_text_chars: int) -> ChatMessage:
    """Validate one raw ``chat`` value, raising :class:`BadMessage` with the reason."""
    if value is None:
        raise BadMessage("null value (tombstone)")
    try:
        document = json.loads(value.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadMessage(f"value is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise BadMessage(f"value is not JSON: {exc.msg} at char {exc.pos}") from None
    if not isinstance(document, dict):
        raise BadMessage(f"value is a JSON {type(document).__name__}, expected an object")
    for field, expected in _REQUIRED.items():
        if field not in document:
            raise BadMessage(f"missing field {field!r}")
        found = document[field]
        # bool is an int in Python, never a valid Timestamp
        if not isinstance(found, expected) or isinstance(found, bool):
            raise BadMessage(
                f"field {field!r} must be {expected.__name__}, got {type(found).__name__}"
            )
    text = document["text"]
    if not text.strip():
        raise BadMessage("empty text")
    if len(text) > max_text_chars:
        raise BadMessage(f"text has {len(text)} characters, the limit is {max_text_chars}")
    problem = conversation_id_problem(document["conversation_id"])
    if problem is not None:
        raise BadMessage(problem)
    return ChatMessage(**{field: document[field] for field in _REQUIRED})


Headers = Mapping[str, bytes] | Sequence[tuple[str, bytes]] | None


def header_pairs(headers: Headers) -> list[tuple[str, bytes]]:
    """Kafka headers as ``(name, value)`` pairs, whether they came as a list or a dict."""
    if not headers:
        return []
    pairs: Any = headers.items() if isinstance(headers, Mapping) else headers
    return list(pairs)


def header_value(headers: Headers, name: str) -> str | None:
    """The first header ``name`` decoded as UTF-8, or None when absent or undecodable."""
    for key, raw in header_pairs(headers):
        if key == name and raw is not None:
            try:
                return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            except UnicodeDecodeError:
                return None
    return None


class ForgetReason(StrEnum):
    REQUEST = "request"  # someone asked: marvin-faust forget, DELETE /conversations/{id}/
    EXPIRED = "expired"  # idle for longer than MARVIN_CONVERSATION_TTL


@dataclass(frozen=True)
class Forget:
    """Delete one conversation's history (a record on the chat topic; see the module doc)."""

    conversation_id: str
    reason: ForgetReason
    Timestamp: int
    idle_since: int | None = None  # expiries only: the newest turn's timestamp at the sweep

    def to_bytes(self) -> bytes:
        document: dict[str, Any] = {
            "uuid": self.conversation_id,
            "role": CONTROL_ROLE,
            "text": FORGET,
            "conversation_id": self.conversation_id,
            "Timestamp": self.Timestamp,
            "reason": self.reason.value,
        }
        if self.idle_since is not None:
            document["idle_since"] = self.idle_since
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()

    @staticmethod
    def headers(message_id: str) -> list[tuple[str, bytes]]:
        return [(CONTROL_HEADER, FORGET.encode()), (MESSAGE_ID_HEADER, message_id.encode())]


def make_forget(
    conversation_id: str, reason: ForgetReason = ForgetReason.REQUEST, idle_since: int | None = None
) -> Forget:
    return Forget(conversation_id, reason, now_ns(), idle_since)


def parse_forget(value: bytes | None) -> Forget:
    """Validate the value of a ``marvin-control: forget`` record, raising :class:`BadMessage`."""
    try:
        document = json.loads(value or b"")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadMessage("forget record: value is not UTF-8 JSON") from None
    if not isinstance(document, dict):
        raise BadMessage("forget record: value is not a JSON object")
    cid, stamp = document.get("conversation_id"), document.get("Timestamp")
    if not isinstance(cid, str):
        raise BadMessage("forget record: conversation_id must be a string")
    if (problem := conversation_id_problem(cid)) is not None:
        raise BadMessage(f"forget record: {problem}")
    if not _is_int(stamp):
        raise BadMessage("forget record: Timestamp must be int")
    try:
        reason = ForgetReason(document.get("reason"))
    except ValueError:
        raise BadMessage(f"forget record: unknown reason {document.get('reason')!r}") from None
    idle_since = document.get("idle_since")
    if reason is ForgetReason.EXPIRED and not _is_int(idle_since):
        raise BadMessage("forget record: an expiry needs idle_since, an int")
    return Forget(cid, reason, stamp, idle_since if reason is ForgetReason.EXPIRED else None)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
