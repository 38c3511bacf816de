"""The backend interface the agent talks to.

llama.cpp calls take seconds, so a generation never runs on the event loop. A backend implements
one of two hooks: :meth:`ChatBackend._generate`, blocking, which runs in a worker thread, at most
:attr:`ChatBackend.parallel` at once (the stand-in); or :meth:`ChatBackend._run`, a coroutine,
for a backend with an engine of its own (llama.cpp). The event loop only awaits: web views,
timers, commits and rebalances keep working meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from langchain_core.messages import BaseMessage


class ModelError(Exception):
    """The model could not produce a reply for this message."""


class ModelTimeout(ModelError):
    """The reply took longer than the configured timeout."""


class ModelLoadError(Exception):
    """The model cannot be loaded; the worker must not start."""


# Receives each piece of text as the model writes it.
TokenSink = Callable[[str], None]


def ignore_tokens(delta: str) -> None:
    """The sink of a generation nobody streams."""


@dataclass(frozen=True)
class Generation:
    text: str
    completion_tokens: int
    seconds: float
    first_token_seconds: float | None = None
    finish_reason: str = "stop"  # or "length": the reply hit MARVIN_MAX_TOKENS
    prompt_tokens: int = 0  # 0 where the backend does not count them
    reused_tokens: int = 0  # of prompt_tokens, served from a cache (llama.cpp's KV reuse)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


def text_of_last_tokens(tokens: Sequence[int], count: int, piece: Callable[[int], bytes]) -> str:
    """The text of the last ``count`` of ``tokens`` (a tokenization of some text), ``piece``
    giving a token's bytes. The bytes are joined before decoding: a character can span tokens.
    A character cut in two at the start is dropped, and so is the whitespace that starts it."""
    if count <= 0:
        return ""
    data = b"".join(piece(token) for token in tokens[-count:])
    return data.decode("utf-8", errors="ignore").lstrip()


class ChatBackend(ABC):
    """A chat model: ``load()`` once, then ``await generate(messages, timeout)`` per reply."""

    name: str = "backend"

    def __init__(self, parallel: int = 1) -> None:
        self.parallel = parallel  # generations that may run at once
        self._slots = threading.BoundedSemaphore(parallel)
        self._loaded = False
        self._ready = asyncio.Event()

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        """Load the model (blocking; call it from a thread). Raises :class:`ModelLoadError`."""
        self._load()
        self._loaded = True

    async def start(self) -> None:
        """Load in a worker thread, then wake everything waiting in :meth:`wait_until_loaded`."""
        await asyncio.to_thread(self.load)
        self._ready.set()

    async def wait_until_loaded(self) -> None:
        await self._ready.wait()

    def _load(self) -> None:  # noqa: B027 - optional hook, most stand-ins have nothing to load
        pass

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model (blocking). The worker leaves it to the process's exit: closing
        while the agent still awaits a reply would fail that reply and dead-letter it."""

    def forget(self, conversation_id: str) -> None:  # noqa: B027 - optional hook
        """Drop what the model keeps of a deleted conversation (its KV cache); never blocks."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` by the model's own tokenizer."""

    @abstractmethod
    def last_tokens(self, text: str, count: int) -> str:
        """The end of ``text`` that is its last ``count`` tokens, cut at a token boundary (all
        of it when it has no more): what the history window keeps of a turn over the budget."""

    def _generate(
        self,
        messages: Sequence[BaseMessage],
        cancel: threading.Event,
        on_token: TokenSink,
        conversation_id: str | None,
    ) -> Generation:
        """Produce a reply, blocking, passing each new piece of text to ``on_token`` as it
        comes (in this thread). Stop early once ``cancel`` is set."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _generate nor _run")

    async def _run(
        self,
        messages: Sequence[BaseMessage],
        cancel: threading.Event,
        on_token: TokenSink,
        conversation_id: str | None,
    ) -> Generation:
        """One generation, awaited on the event loop, which calls ``on_token`` with each piece
        of text. By default :meth:`_generate` in a worker thread, once one of the
        :attr:`parallel` slots is free."""
        sink = on_token if on_token is ignore_tokens else self._on_loop(on_token, cancel)

        def run() -> Generation:
            with self._slots:
                if cancel.is_set():  # gave up while waiting for a slot
                    raise ModelTimeout("cancelled before it started")
                return self._generate(messages, cancel, sink, conversation_id)

        return await asyncio.to_thread(run)

    async def generate(
        self,
        messages: Sequence[BaseMessage],
        timeout: float,
        on_token: TokenSink | None = None,
        conversation_id: str | None = None,
    ) -> Generation:
        """One generation; :class:`ModelTimeout` after ``timeout`` s.

        ``on_token`` is called on this event loop with each piece of text as the model writes
        it, never after this returns or raises. ``conversation_id`` lets a backend reuse what
        it kept of that conversation's last turn.
        """
        if not self._loaded:
            raise ModelError(f"{self.name} model is not loaded")
        cancel = threading.Event()
        started = time.monotonic()
        sink = on_token or ignore_tokens
        try:
            return await asyncio.wait_for(
                self._run(messages, cancel, sink, conversation_id), timeout
            )
        except TimeoutError:
            raise ModelTimeout(
                f"no reply after {time.monotonic() - started:.1f}s (timeout {timeout:g}s)"
            ) from None
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            # The thread outlives a timed-out await: tell it to stop and free its slot.
            cancel.set()

    @staticmethod
    def _on_loop(on_token: TokenSink, cancel: threading.Event) -> TokenSink:
        """A sink for the worker thread that hands each piece to ``on_token`` on this loop;
        pieces still on their way when the call ended are dropped."""
        loop = asyncio.get_running_loop()

        def deliver(delta: str) -> None:
            if not cancel.is_set():
                on_token(delta)

        def from_thread(delta: str) -> None:
            if not cancel.is_set():
                loop.call_soon_threadsafe(deliver, delta)

        return from_thread
