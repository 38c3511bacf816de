"""Continuous batching on llama.cpp's low-level API: one model answers several conversations.

llama-cpp-python's high-level ``Llama`` decodes a single sequence. :class:`BatchedEngine` drives
llama.cpp through the ctypes bindings instead, so that one worker process serves up to
``n_parallel`` replies at once: llama.cpp decodes a batch of several sequences at little more
cost than one, and keeps each sequence's KV cache so that a conversation's next turn only
evaluates its new tokens.

Design:

- **One decode thread** owns the llama.cpp context; :meth:`BatchedEngine.submit` only appends to
  a FIFO queue and returns a :class:`concurrent.futures.Future`. ``ctypes`` releases the GIL
  during ``llama_decode``, so an asyncio event loop in the same process keeps running.
- **Slots.** Each of the ``n_parallel`` llama.cpp sequences is a :class:`_Slot`: its sequence id,
  the exact tokens it holds in the KV cache, the session (conversation) they belong to, and the
  request it runs, if any. Requests wait in FIFO order for a free slot.
- **Continuous batching.** Each step puts in one ``llama_batch`` one token of every sequence that
  is generating, then prompt tokens of sequences being prefilled, in admission order, up to
  ``n_batch`` tokens (a long prompt takes several steps). One ``llama_decode``, then each
  sequence with logits samples from its own batch index with its own sampler chain. Requests join
  and leave between steps.
- **KV reuse.** A request goes to the free slot holding its session, else to the least recently
  used free slot holding no session, else to the least recently used free slot. Whichever it
  gets, it evaluates only the tokens past the common prefix of the slot's cached tokens and its
  prompt, and at least its last prompt token, whose logits give the first reply token.
  ``llama_memory_seq_rm`` removes the rest; when it cannot remove part of a sequence, or a
  sliding window lost cells the new tokens attend to, the sequence is cleared and the whole
  prompt evaluated.
- **Threads.** Steps with prompt tokens run on all cores, generation steps on ``n_threads``
  (half the cores by default, as llama-cpp-python generates a single sequence). llama.cpp would
  put any batch of several tokens on the prompt threads, whose barriers spin after every graph
  node: when the event loop or another process takes a core, such a step took five to fifteen
  times as long here.
- **Unified KV cache.** ``n_ctx`` is each sequence's context; the cache has ``kv_size`` cells,
  ``n_ctx * n_parallel`` by default, which the sequences share (``kv_unified``): so the running
  replies always fit, and the cells they do not use keep idle sessions' caches. When a step finds
  no free cell (``llama_decode`` returns 1), the least recently used idle slot is evicted and the
  step retried; when no idle slot is left (only with a smaller ``kv_size``), the youngest request
  fails with :class:`EngineError` and the others go on. Models with sliding-window attention
  (Gemma 3) get ``swa_full``: a partial ``llama_memory_seq_rm`` can fail on a window-sized cache.
- **Text.** Pieces from ``llama_token_to_piece`` can split a UTF-8 character, so each reply has an
  incremental UTF-8 decoder; text that may still begin a stop sequence is held back too.
  ``on_piece``, called on the decode thread, receives only final text: its pieces add up to
  :attr:`Completion.text`.
- **Cancellation.** A request whose ``cancel`` event is set leaves before the next step; its
  future fails with :class:`EngineCancelled`. A prompt chunk can take seconds on a CPU, so steps
  that evaluate prompt tokens also install llama.cpp's abort callback: it stops ``llama_decode``
  when every sequence in the batch is cancelled (or the engine closes), and the sequences are
  rolled back to where they were before the step. The callback is Python, and llama.cpp calls it
  after every graph node (hundreds per decode), taking the GIL each time: on generation steps,
  which last milliseconds, that cost about 8% of throughput here for nothing, so they run without
  it. llama.cpp honours the callback on the CPU only; on a GPU a prompt stops at the next chunk.
- **Determinism.** A reply does not depend on what the other sequences in the batch say
  (attention never crosses sequences), and the same greedy or seeded requests, submitted the
  same way to a fresh engine, give the same replies. It does depend on the shapes of the
  batches, through rounding: llama.cpp's CPU kernels round differently for a one-token step
  than for a prompt chunk, repacked weights take a batch's rows four at a time, and attention
  adds up a sequence's cells in cache order, which removals from the shared cache can shuffle.
  So a greedy reply computed alone, beside other sequences or from a reused prefix may take
  another token where two are nearly tied, as llama.cpp documents for its server's prompt
  cache. Without weight repacking (``use_extra_bufts``), one-token steps of up to four sequences
  would match a sequence alone, but a single sequence generates about 10% slower here (batches
  of four on two threads nearly 30%), and reuse still would not match.
- **GPU.** Nothing is CPU-specific: ``n_gpu_layers`` goes to the model (-1 = all layers) and
  flash attention is llama.cpp's automatic choice.
- **Sampling** is llama-cpp-python's ``Llama._init_sampler`` chain, so replies read as through
  the high-level API: penalties over the last 64 tokens, top-k, top-p, min-p, temperature,
  distribution; at temperature 0 penalties then greedy. One fresh chain per request.

Importing this module loads nothing; llama-cpp-python and the model load when an engine is made.
"""

from __future__ import annotations

import codecs
import ctypes
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import llama_cpp

# llama-cpp-python's high-level API penalises repetitions among the last 64 tokens by default.
PENALTY_LAST_N = 64


@dataclass(frozen=True)
class Sampling:
    """How to sample a reply; the defaults are the project's."""

    max_tokens: int = 250  # <= 0: until the context is full
    temperature: float = 0.7  # <= 0: greedy
    top_p: float = 0.95
    top_k: int = 150
    repeat_penalty: float = 1.2
    seed: int = -1  # -1: random; otherwise each request's chain is seeded with it
    stop: tuple[str, ...] = ()  # the reply ends before the first one, which is not part of the text
    min_p: float = 0.05  # llama-cpp-python's create_completion default


@dataclass(frozen=True)
class Completion:
    """A finished reply."""

    text: str  # the whole reply text (not stripped), stop sequence excluded
    completion_tokens: int
    prompt_tokens: int
    reused_tokens: int  # prompt tokens served from the KV cache (not evaluated again)
    finish_reason: str  # "stop" (end-of-generation token or stop sequence) or "length"
    first_token_seconds: float | None  # from submit to the first piece
    seconds: float  # from submit to the end


@dataclass(frozen=True)
class EngineStats:
    """What the engine is doing, and has done since it was made."""

    running: int  # requests holding a slot now
    waiting: int  # requests queued for a slot
    peak_running: int
    steps: int  # successful llama_decode calls
    prompt_tokens_evaluated: int
    tokens_generated: int
    aborted_decodes: int  # llama_decode calls stopped by the abort callback


class EngineError(Exception):
    """A request that cannot be served (prompt longer than the context, decode failure...)."""


class EngineCancelled(EngineError):
    """The request's ``cancel`` event was set."""


class BatchedEngine:
    """Up to ``n_parallel`` completions at once from one llama.cpp model (see the module doc)."""

    def __init__(
        self,
        model_path: str,
        *,
        n_ctx: int = 2048,
        n_parallel: int = 4,
        n_gpu_layers: int = -1,
        n_threads: int | None = None,
        n_batch: int = 512,
        kv_size: int | None = None,
    ) -> None:
        """Load the model and make the context; raises :class:`EngineError` if llama.cpp cannot.

        ``n_ctx``: tokens of one sequence, prompt and reply. ``kv_size``: cells of the shared KV
        cache, ``n_ctx * n_parallel`` by default. ``n_threads``: ``None`` generates on half the
        cores and evaluates prompts on all of them; a number is used for both.
        """
        if not 1 <= n_parallel <= n_batch:
            raise EngineError(f"need 1 <= n_parallel <= n_batch, got {n_parallel} and {n_batch}")
        self._llama = _Llama(
            model_path,
            kv_size=kv_size or n_ctx * n_parallel,
            n_parallel=n_parallel,
            n_gpu_layers=n_gpu_layers,
            n_threads=n_threads,
            n_batch=n_batch,
            should_abort=self._should_abort,
        )
        self.metadata: dict[str, str] = self._llama.metadata()
        self.n_ctx = n_ctx
        self.kv_size = self._llama.kv_size
        self._n_batch = n_batch
        self._slots = [_Slot(seq) for seq in range(n_parallel)]
        self._queue: deque[_Request] = deque()
        self._lock = threading.Condition()  # guards _queue, _forgotten, _closed and _thread
        self._forgotten: set[str] = set()  # sessions whose cache the decode thread drops
        self._closed = False
        self._thread: threading.Thread | None = None
        self._ticks = itertools.count(1)  # orders admissions and slot use
        self._in_flight: list[_Job] = []  # the jobs of the running llama_decode
        self._counters = _Counters()

    # --- model facts, for prompt building (any thread) ---

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        return self._llama.tokenize(text, add_bos=add_bos, special=special)

    def token_bos(self) -> int:
        return self._llama.bos_eos()[0]

    def token_eos(self) -> int:
        return self._llama.bos_eos()[1]

    def token_text(self, token: int) -> str:
        return self._llama.piece(token, special=True).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        """A text token's bytes: a character can span tokens, so join them before decoding."""
        return self._llama.piece(token, special=False)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text, add_bos=False, special=False))

    @property
    def stats(self) -> EngineStats:
        with self._lock:
            waiting = len(self._queue)
        return EngineStats(len(self._running()), waiting, **asdict(self._counters))

    # --- life cycle ---

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop the decode thread, fail what is running or queued, free llama.cpp's memory."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
        closed = EngineError("the engine was closed")
        for slot in self._running():
            self._end(slot, error=closed)
        for request in self._take_queued(lambda _: True):
            request.future.set_exception(closed)
        self._llama.close()

    def __enter__(self) -> BatchedEngine:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- requests ---

    def submit(
        self,
        prompt: list[int],
        sampling: Sampling,
        *,
        session: str | None = None,
        on_piece: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Future[Completion]:
        """Queue a completion of ``prompt``; thread-safe, never blocks.

        ``session`` names the conversation, whose KV cache its next turn reuses. ``on_piece``
        gets each piece of final reply text, on the decode thread: it must return quickly.
        """
        future: Future[Completion] = Future()
        request = _Request(
            list(prompt), sampling, session, on_piece, cancel or threading.Event(), future
        )
        error = self._check_prompt(request.prompt)
        with self._lock:
            if error is None and self._closed:
                error = EngineError("the engine is closed")
            if error is None:
                self._queue.append(request)
                self._lock.notify()
        if error is not None:
            future.set_exception(error)
        return future

    def forget_session(self, session: str) -> None:
        """Drop what the KV cache holds of ``session`` (a deleted conversation); thread-safe,
        never blocks. The decode thread frees its cells before its next step, or when a
        completion of that session still running ends. llama.cpp frees cells for reuse
        without zeroing them."""
        with self._lock:
            self._forgotten.add(session)
            self._lock.notify()

    def _check_prompt(self, prompt: Sequence[int]) -> EngineError | None:
        if not prompt:
            return EngineError("empty prompt")
        if len(prompt) > self.n_ctx:
            return EngineError(
                f"prompt of {len(prompt)} tokens does not fit the context of {self.n_ctx}"
            )
        # An invalid token would fail the whole batch, the other sequences with it.
        if not all(0 <= token < self._llama.n_vocab for token in prompt):
            return EngineError("prompt holds a token outside the vocabulary")
        return None

    # --- the decode thread ---

    def _run(self) -> None:
        while self._wait_for_work():
            try:
                self._drop_forgotten()
                self._drop_cancelled()
                self._admit()
                if self._running():
                    self._step()
            except Exception as exc:  # a bug must not leave every future waiting forever
                self._reset(EngineError(f"engine step failed: {exc!r}"))

    def _wait_for_work(self) -> bool:
        with self._lock:
            while not (self._closed or self._queue or self._running() or self._forgotten):
                self._lock.wait()
            return not self._closed

    def _running(self) -> list[_Slot]:
        return [slot for slot in self._slots if slot.job is not None]

    def _take_queued(self, which: Callable[[_Request], bool]) -> list[_Request]:
        with self._lock:
            taken = [request for request in self._queue if which(request)]
            for request in taken:
                self._queue.remove(request)
        return taken

    def _drop_forgotten(self) -> None:
        with self._lock:
            forgotten, self._forgotten = self._forgotten, set()
        for slot in self._slots:
            if slot.session is None or slot.session not in forgotten:
                continue
            if slot.job is None:
                self._clear(slot)
            else:  # after its completion: the loop comes back here when it ends
                with self._lock:
                    self._forgotten.add(slot.session)

    def _drop_cancelled(self) -> None:
        for slot in self._running():
            if _job(slot).request.cancel.is_set():
                self._end(slot, error=EngineCancelled("cancelled"))
        for request in self._take_queued(lambda request: request.cancel.is_set()):
            request.future.set_exception(EngineCancelled("cancelled while queued"))

    def _admit(self) -> None:
        """Give the free slots to the requests at the head of the queue."""
        while len(self._running()) < len(self._slots):
            with self._lock:
                if not self._queue:
                    return
                request = self._queue.popleft()
            if request.future.set_running_or_notify_cancel():  # False: Future.cancel() was called
                self._start(self._pick_slot(request.session), request)

    def _pick_slot(self, session: str | None) -> _Slot:
        free = [slot for slot in self._slots if slot.job is None]
        if session is not None:
            for slot in free:
                if slot.session == session:
                    return slot
        unclaimed = [slot for slot in free if slot.session is None]
        return min(unclaimed or free, key=lambda slot: slot.last_used)

    def _start(self, slot: _Slot, request: _Request) -> None:
        if request.session is not None:
            for other in self._slots:
                if other.session == request.session:
                    other.session = None  # one slot per session: the newest
        slot.session = request.session
        reused = self._keep_prefix(slot, request.prompt)
        slot.job = _Job(
            request,
            chain=self._llama.new_chain(request.sampling),
            pending=request.prompt[reused:],
            reused=reused,
            admitted=next(self._ticks),
            text=_ReplyText(request.sampling.stop),
        )
        self._counters.peak_running = max(self._counters.peak_running, len(self._running()))

    def _keep_prefix(self, slot: _Slot, prompt: list[int]) -> int:
        """Trim the slot's cache to its common prefix with ``prompt``; return its length."""
        keep = 0
        # The last prompt token is always evaluated: its logits give the first reply token.
        limit = min(len(slot.cached), len(prompt) - 1)
        while keep < limit and slot.cached[keep] == prompt[keep]:
            keep += 1
        if not (self._llama.forget(slot.seq, keep) and self._llama.holds_window(slot.seq, keep)):
            self._llama.forget(slot.seq, 0)  # removing a whole sequence never fails
            keep = 0
        del slot.cached[keep:]
        return keep

    def _step(self) -> None:
        parts = self._fill_batch()
        self._llama.prepare_step(with_prompt=any(part.job.in_prompt for part in parts))
        self._in_flight = [part.job for part in parts]
        status = self._llama.decode()
        self._in_flight = []
        if status == 0:
            self._counters.steps += 1
            for part in parts:
                self._advance(part)
        elif status == 1:  # no free cell; llama.cpp left the cache as it was
            self._make_room()
        else:  # aborted or failed: ubatches already evaluated stay in the cache, undo them
            for part in parts:
                self._roll_back(part.slot)
            if status == 2:
                self._counters.aborted_decodes += 1  # the cancelled jobs leave next round
            else:
                for part in parts:
                    self._end(part.slot, error=EngineError(f"llama_decode failed ({status})"))

    def _fill_batch(self) -> list[_Part]:
        """Put this step's tokens in the batch: generating sequences first, then prompts."""
        parts = []
        budget = self._n_batch  # >= n_parallel: every generating sequence fits
        for slot in sorted(self._running(), key=lambda slot: _job(slot).order):
            job = _job(slot)
            tokens = job.pending[:budget]
            if not tokens:
                break
            last = len(tokens) == len(job.pending)  # logits after the last pending token only
            index = self._llama.add(slot.seq, len(slot.cached), tokens, output=last)
            parts.append(_Part(slot, job, tokens, index if last else None))
            budget -= len(tokens)
        return parts

    def _should_abort(self) -> bool:
        """llama.cpp's abort callback, called during ``llama_decode``."""
        jobs = self._in_flight
        return self._closed or (bool(jobs) and all(job.request.cancel.is_set() for job in jobs))

    def _advance(self, part: _Part) -> None:
        slot, job = part.slot, part.job
        slot.cached.extend(part.tokens)
        del job.pending[: len(part.tokens)]
        if job.in_prompt:
            self._counters.prompt_tokens_evaluated += len(part.tokens)
        if part.output is None:
            return
        try:
            self._take(slot, job, self._llama.sample(job.chain, part.output))
        except Exception as exc:  # on_piece raised: end this reply, not the others
            self._end(slot, error=EngineError(f"reply stopped: {exc!r}"))

    def _take(self, slot: _Slot, job: _Job, token: int) -> None:
        """Handle a sampled token: end the reply or keep the token for the next step."""
        job.in_prompt = False
        if self._llama.is_end(token):
            self._emit(job, job.text.flush())
            self._end(slot, reason="stop")
            return
        job.completion_tokens += 1
        self._counters.tokens_generated += 1
        self._emit(job, job.text.feed(self._llama.piece(token, special=False)))
        if job.text.stopped:
            self._end(slot, reason="stop")
        elif job.completion_tokens == job.request.sampling.max_tokens or (
            len(slot.cached) >= self.n_ctx  # no position left for this token
        ):
            self._emit(job, job.text.flush())
            self._end(slot, reason="length")
        else:
            job.pending.append(token)

    def _emit(self, job: _Job, piece: str) -> None:
        if not piece:
            return
        if job.first_piece_at is None:
            job.first_piece_at = time.perf_counter()
        if job.request.on_piece is not None:
            job.request.on_piece(piece)

    def _end(self, slot: _Slot, *, reason: str = "", error: EngineError | None = None) -> None:
        """Free the slot (its cache stays, for the session) and settle the request's future."""
        job, slot.job = _job(slot), None
        slot.last_used = next(self._ticks)
        self._llama.free_chain(job.chain)
        request = job.request
        if error is not None:
            request.future.set_exception(error)
            return
        first = None if job.first_piece_at is None else job.first_piece_at - request.submitted
        request.future.set_result(
            Completion(
                text=job.text.text,
                completion_tokens=job.completion_tokens,
                prompt_tokens=len(request.prompt),
                reused_tokens=job.reused,
                finish_reason=reason,
                first_token_seconds=first,
                seconds=time.perf_counter() - request.submitted,
            )
        )

    def _make_room(self) -> None:
        """Free cells: evict the least recently used idle slot, else fail the youngest request."""
        idle = [slot for slot in self._slots if slot.job is None and slot.cached]
        if idle:
            self._clear(min(idle, key=lambda slot: slot.last_used))
            return
        youngest = max(self._running(), key=lambda slot: _job(slot).admitted)
        self._clear(youngest)
        self._end(youngest, error=EngineError(f"the KV cache of {self.kv_size} cells is full"))

    def _clear(self, slot: _Slot) -> None:
        self._llama.forget(slot.seq, 0)
        slot.cached.clear()
        slot.session = None

    def _roll_back(self, slot: _Slot) -> None:
        """Remove what an aborted or failed ``llama_decode`` left past the slot's tokens."""
        if not self._llama.forget(slot.seq, len(slot.cached)):
            self._clear(slot)

    def _reset(self, error: EngineError) -> None:
        for slot in self._running():
            self._end(slot, error=error)
        for slot in self._slots:
            self._clear(slot)


@dataclass
class _Counters:
    """The decode thread's part of :class:`EngineStats`."""

    peak_running: int = 0
    steps: int = 0
    prompt_tokens_evaluated: int = 0
    tokens_generated: int = 0
    aborted_decodes: int = 0


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    sampling: Sampling
    session: str | None
    on_piece: Callable[[str], None] | None
    cancel: threading.Event
    future: Future[Completion]
    submitted: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class _Job:
    """A request running in a slot."""

    request: _Request
    chain: llama_cpp.llama_sampler_p  # its sampler chain
    pending: list[int]  # to evaluate: the rest of the prompt, then the last sampled token
    reused: int
    admitted: int
    text: _ReplyText
    in_prompt: bool = True
    completion_tokens: int = 0
    first_piece_at: float | None = None

    @property
    def order(self) -> tuple[bool, int]:
        """Batch order: generating before prefilling, then first admitted first."""
        return self.in_prompt, self.admitted


@dataclass(eq=False)
class _Slot:
    """One llama.cpp sequence."""

    seq: int
    cached: list[int] = field(default_factory=list)  # exactly the tokens in its KV cache
    session: str | None = None
    last_used: int = 0
    job: _Job | None = None


def _job(slot: _Slot) -> _Job:
    """The job of a slot known to be running."""
    assert slot.job is not None
    return slot.job


@dataclass(frozen=True)
class _Part:
    """One sequence's tokens in a step's batch."""

    slot: _Slot
    job: _Job
    tokens: list[int]
    output: int | None  # batch index of the logits to sample from


class _ReplyText:
    """A reply's token bytes in, final text out.

    Holds back an incomplete UTF-8 character and any tail that may still become a stop sequence;
    ends the text before the first stop sequence.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = [s for s in stop if s]
        self._longest = max((len(s) for s in self._stop), default=0)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.stopped = False
        self._released = 0

    def feed(self, data: bytes) -> str:
        """Add a token's bytes; return the text that became final."""
        # A stop sequence not found before can only end in the new text.
        start = max(0, len(self.text) - self._longest + 1)
        self.text += self._decoder.decode(data)
        found = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if found:
            self.text = self.text[: min(found)]
            self.stopped = True
            return self._release(len(self.text))
        return self._release(len(self.text) - self._stop_prefix_length())

    def flush(self) -> str:
        """The reply ended without a stop sequence: release everything held back."""
        self.text += self._decoder.decode(b"", final=True)
        return self._release(len(self.text))

    def _stop_prefix_length(self) -> int:
        """Length of the longest unreleased tail that begins a stop sequence."""
        for n in range(min(self._longest - 1, len(self.text) - self._released), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _release(self, end: int) -> str:
        piece = self.text[self._released : end]
        self._released = end
        return piece


_backend_lock = threading.Lock()
_backend_ready = False


class _Llama:
    """The native side: model, context, KV cache and one batch, through the ctypes bindings."""

    def __init__(
        self,
        model_path: str,
        *,
        kv_size: int,
        n_parallel: int,
        n_gpu_layers: int,
        n_threads: int | None,
        n_batch: int,
        should_abort: Callable[[], bool],
    ) -> None:
        import llama_cpp  # here, not at import: it loads the shared library

        self.lib: ModuleType = llama_cpp
        if not Path(model_path).is_file():
            raise EngineError(f"model file not found: {model_path}")
        _init_backend(llama_cpp)
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        self.model: llama_cpp.llama_model_p = llama_cpp.llama_model_load_from_file(
            model_path.encode(), model_params
        )
        if not self.model:
            raise EngineError(f"llama.cpp could not load the model {model_path}")
        self.vocab: llama_cpp.llama_vocab_p = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_swa: int = llama_cpp.llama_model_n_swa(self.model)
        # Keep references: llama.cpp holds only the function pointer.
        self._abort = llama_cpp.ggml_abort_callback(lambda _data: should_abort())
        self._no_abort = llama_cpp.ggml_abort_callback()
        cpus = os.cpu_count() or 1
        # llama-cpp-python's defaults: generation on half the cores, prompts on all of them.
        self._threads = n_threads or max(cpus // 2, 1)
        self._prompt_threads = n_threads or cpus
        self._prompt_step: bool | None = None
        self.ctx: llama_cpp.llama_context_p = llama_cpp.llama_init_from_model(
            self.model, self._context_params(kv_size, n_parallel, n_batch)
        )
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise EngineError(
                f"llama.cpp could not make a context of {kv_size} tokens for {n_parallel} sequences"
            )
        self.kv_size: int = llama_cpp.llama_n_ctx(self.ctx)
        self.mem: llama_cpp.llama_memory_t = llama_cpp.llama_get_memory(self.ctx)
        self.batch: llama_cpp.llama_batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._batch_size = 0
        self.closed = False

    def _context_params(
        self, kv_size: int, n_parallel: int, n_batch: int
    ) -> llama_cpp.llama_context_params:
        params = self.lib.llama_context_default_params()
        params.n_ctx = kv_size
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, 512)  # as llama-cpp-python
        params.n_seq_max = n_parallel
        params.kv_unified = True
        params.swa_full = self.n_swa > 0
        params.n_threads = self._threads
        params.n_threads_batch = self._prompt_threads
        params.no_perf = True
        return params

    def metadata(self) -> dict[str, str]:
        """The GGUF metadata as strings (llama.cpp leaves arrays out)."""
        lib = self.lib
        pairs = {}
        for i in range(lib.llama_model_meta_count(self.model)):
            key = _read_string(partial(lib.llama_model_meta_key_by_index, self.model, i))
            pairs[key] = _read_string(partial(lib.llama_model_meta_val_str_by_index, self.model, i))
        return pairs

    def open_vocab(self) -> llama_cpp.llama_vocab_p:
        """The vocabulary, for callers on any thread: it is freed with the model."""
        if self.closed:
            raise EngineError("the engine is closed")
        return self.vocab

    def bos_eos(self) -> tuple[int, int]:
        vocab = self.open_vocab()
        return self.lib.llama_vocab_bos(vocab), self.lib.llama_vocab_eos(vocab)

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        vocab, data = self.open_vocab(), text.encode()
        size = len(data) + 2
        while True:
            tokens = (self.lib.llama_token * size)()
            n = self.lib.llama_tokenize(vocab, data, len(data), tokens, size, add_bos, special)
            if n >= 0:
                return tokens[:n]
            size = -n

    def piece(self, token: int, *, special: bool) -> bytes:
        vocab, size = self.open_vocab(), 32
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self.lib.llama_token_to_piece(vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def is_end(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def new_chain(self, sampling: Sampling) -> llama_cpp.llama_sampler_p:
        """A sampler chain like llama-cpp-python's ``Llama._init_sampler``."""
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        samplers = [
            lib.llama_sampler_init_penalties(
                self.n_vocab, PENALTY_LAST_N, sampling.repeat_penalty, 0.0, 0.0
            )
        ]
        if sampling.temperature <= 0:
            samplers.append(lib.llama_sampler_init_greedy())
        else:
            seed = lib.LLAMA_DEFAULT_SEED if sampling.seed == -1 else sampling.seed & 0xFFFFFFFF
            samplers += [
                lib.llama_sampler_init_top_k(sampling.top_k),
                lib.llama_sampler_init_top_p(sampling.top_p, 1),
                lib.llama_sampler_init_min_p(sampling.min_p, 1),
                lib.llama_sampler_init_temp(sampling.temperature),
                lib.llama_sampler_init_dist(seed),
            ]
        for sampler in samplers:
            lib.llama_sampler_chain_add(chain, sampler)  # the chain owns and frees them
        return chain

    def free_chain(self, chain: llama_cpp.llama_sampler_p) -> None:
        self.lib.llama_sampler_free(chain)

    def sample(self, chain: llama_cpp.llama_sampler_p, index: int) -> int:
        """Sample from the logits at batch ``index``; the chain accepts the token itself."""
        return self.lib.llama_sampler_sample(chain, self.ctx, index)

    def add(self, seq: int, pos: int, tokens: Sequence[int], *, output: bool) -> int:
        """Append ``tokens`` of sequence ``seq`` from position ``pos``; return the last index."""
        batch, start = self.batch, self._batch_size
        for i, token in enumerate(tokens, start):
            batch.token[i] = token
            batch.pos[i] = pos + i - start
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 0
        self._batch_size += len(tokens)
        last = self._batch_size - 1
        batch.logits[last] = output
        return last

    def prepare_step(self, *, with_prompt: bool) -> None:
        """Prompt chunks get all the threads and the abort callback; generation steps neither."""
        if with_prompt != self._prompt_step:
            batch_threads = self._prompt_threads if with_prompt else self._threads
            self.lib.llama_set_n_threads(self.ctx, self._threads, batch_threads)
            callback = self._abort if with_prompt else self._no_abort
            self.lib.llama_set_abort_callback(self.ctx, callback, None)
            self._prompt_step = with_prompt

    def decode(self) -> int:
        """Decode the batch and empty it: 0 ok, 1 no free cell, 2 aborted, else an error."""
        self.batch.n_tokens, self._batch_size = self._batch_size, 0
        return self.lib.llama_decode(self.ctx, self.batch)

    def forget(self, seq: int, start: int) -> bool:
        """Remove the sequence's cache from position ``start`` on; False if it cannot."""
        return bool(self.lib.llama_memory_seq_rm(self.mem, seq, start, -1))

    def holds_window(self, seq: int, pos: int) -> bool:
        """Whether the cache still holds what a token at ``pos`` attends to.

        llama.cpp reuses the cells of tokens that left a sequence's sliding window, so a
        trimmed sequence may lack the window of its next token (the check of llama.cpp's server).
        """
        return self.lib.llama_memory_seq_pos_min(self.mem, seq) <= max(0, pos - self.n_swa)

    def close(self) -> None:
        self.closed = True
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def _read_string(read: Callable[[Any, int], int]) -> str:
    """Call a llama.cpp function that fills a char buffer like snprintf, with a large enough one."""
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        length = read(buf, size)  # the whole length, also when cut
        if length < size:
            return buf.raw[: max(length, 0)].decode("utf-8", errors="replace")
        size = length + 1


def _init_backend(lib: ModuleType) -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            lib.llama_backend_init()
            _backend_ready = True
