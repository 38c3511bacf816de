"""A deterministic stand-in model, shipped in the package like httpx ships ``MockTransport``.

It replies by echoing the prompt it was given, so tests can see exactly what reached the model
(persona left out), and it can be told to misbehave by markers in the human text:

- ``[fail]``: the call raises, as a crashed model would;
- ``[hang]``: the call blocks until the timeout gives up on it.

Tokens are whitespace-separated words. The reply streams one token at a time, evenly spread
over ``latency`` seconds, so a slow stand-in shows partial replies the way a real model does.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence

from langchain_core.messages import BaseMessage, SystemMessage

from .base import ChatBackend, Generation, TokenSink

FAIL_MARKER = "[fail]"
HANG_MARKER = "[hang]"


def render_echo(messages: Sequence[BaseMessage]) -> str:
    """The stand-in's reply: one line per non-system prompt message, ``type: text``."""
    lines = [f"{m.type}: {m.content}" for m in messages if not isinstance(m, SystemMessage)]
    return "\n".join(lines)


class StandInBackend(ChatBackend):
    name = "standin"

    def __init__(self, latency: float = 0.0, parallel: int = 1) -> None:
        super().__init__(parallel)
        self.latency = latency
        self.calls = 0
        self.forgotten: list[str] = []  # conversation ids, in the order forgotten
        self._counting = threading.Lock()

    def forget(self, conversation_id: str) -> None:
        self.forgotten.append(conversation_id)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def last_tokens(self, text: str, count: int) -> str:
        if count <= 0:
            return ""
        starts = [word.start() for word in re.finditer(r"\S+", text)]
        return text if count >= len(starts) else text[starts[-count] :]

    def _generate(
        self,
        messages: Sequence[BaseMessage],
        cancel: threading.Event,
        on_token: TokenSink,
        conversation_id: str | None,
    ) -> Generation:
        started = time.perf_counter()
        with self._counting:
            self.calls += 1
        last = str(messages[-1].content) if messages else ""
        if HANG_MARKER in last:
            cancel.wait()
        if FAIL_MARKER in last:
            raise RuntimeError("stand-in model failure requested by [fail]")
        text = render_echo(messages)
        # Each piece keeps the whitespace before it, so the pieces add up to the text.
        pieces = re.findall(r"\s*\S+", text) or [text]
        first_token: float | None = None
        for index, piece in enumerate(pieces, start=1):
            # Paced against the start, not piece by piece: the total stays ``latency``.
            due = started + self.latency * index / len(pieces)
            if cancel.wait(max(0.0, due - time.perf_counter())):
                break
            if first_token is None:
                first_token = time.perf_counter() - started
            on_token(piece)
        return Generation(
            text=text,
            completion_tokens=self.count_tokens(text),
            seconds=time.perf_counter() - started,
            first_token_seconds=first_token,
        )
