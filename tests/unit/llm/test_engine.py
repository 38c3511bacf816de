"""The continuous-batching engine on the real offline Gemma 3 270M GGUF.

Greedy replies are compared token for token (text and token count) where llama.cpp computes
them with batches of the same shapes: its CPU kernels round differently for other shapes (see
"Determinism" in ``marvin_faust.llm.engine``), so a reply alone and the same reply beside other
sequences, or after KV reuse, can part where two tokens are nearly tied. Those tests start from
an empty cache.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import llama_cpp
import pytest

from marvin_faust.llm.engine import (
    BatchedEngine,
    Completion,
    EngineCancelled,
    EngineError,
    Sampling,
    _ReplyText,
)
from marvin_faust.llm.sources import assemble_offline_model

pytestmark = pytest.mark.model

GREEDY = Sampling(max_tokens=32, temperature=0)
QUESTIONS = [
    "Tell me a story.",
    "What is the capital of France?",
    "Write a poem about the sea.",
    "How do I bake bread?",
]


def chat(question: str) -> str:
    return f"Human: {question}\nMarvin:"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(assemble_offline_model(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def engine(model_path: str) -> Iterator[BatchedEngine]:
    with BatchedEngine(model_path, n_ctx=2048, n_parallel=4) as engine:
        yield engine


@pytest.fixture
def new_engine(model_path: str) -> Iterator[Callable[..., BatchedEngine]]:
    """Engines with an empty cache, closed after the test."""
    engines: list[BatchedEngine] = []

    def make(*, started: bool = True, **options: int) -> BatchedEngine:
        engines.append(BatchedEngine(model_path, **options))
        if started:
            engines[-1].start()
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def prompt(engine: BatchedEngine, text: str) -> list[int]:
    return engine.tokenize(text, add_bos=True, special=False)


def same_reply(a: Completion, b: Completion) -> bool:
    return (a.text, a.completion_tokens) == (b.text, b.completion_tokens)


def test_model_facts(engine: BatchedEngine) -> None:
    assert engine.metadata["general.architecture"] == "gemma3"
    assert engine.token_text(engine.token_bos()) == "<bos>"
    assert engine.token_text(engine.token_eos()) == "<eos>"
    assert engine.tokenize("Hi", add_bos=True, special=False)[0] == engine.token_bos()
    assert engine.count_tokens("Hello world") == 2


def test_greedy_reply_is_the_high_level_apis_reply(
    new_engine: Callable[..., BatchedEngine], model_path: str
) -> None:
    engine = new_engine()
    tokens = prompt(engine, chat(QUESTIONS[0]))
    alone = engine.submit(tokens, GREEDY).result()
    assert alone.completion_tokens == GREEDY.max_tokens

    # Llama's default is no flash attention; the engine leaves it to llama.cpp, which turns it on
    # for the CPU. It changes rounding, and greedy decoding picks between near-ties.
    llama = llama_cpp.Llama(model_path, n_ctx=2048, flash_attn=True, verbose=False)
    try:
        high = llama.create_completion(
            tokens, max_tokens=GREEDY.max_tokens, temperature=0, repeat_penalty=1.2
        )
    finally:
        llama.close()
    assert high["choices"][0]["text"] == alone.text
    assert high["usage"]["completion_tokens"] == alone.completion_tokens


def test_a_reply_does_not_depend_on_the_other_sequences(
    new_engine: Callable[..., BatchedEngine],
) -> None:
    """The same prompt beside two different trios, in batches of the same shapes."""

    def beside(animals: list[str]) -> Completion:
        engine = new_engine(started=False)  # all four in the first step, whatever the timing
        prompts = [prompt(engine, chat(f"Tell me a story about a {a}.")) for a in animals]
        assert {len(p) for p in prompts} == {len(prompts[0])}
        futures = [engine.submit(p, GREEDY) for p in prompts]
        engine.start()
        replies = [future.result() for future in futures]
        assert engine.stats.peak_running == 4
        assert len({reply.text for reply in replies}) == 4
        return replies[0]

    assert same_reply(
        beside(["cat", "dog", "horse", "bird"]), beside(["cat", "fish", "cow", "lion"])
    )


def test_next_turn_reuses_the_session_cache(new_engine: Callable[..., BatchedEngine]) -> None:
    engine = new_engine()
    first = prompt(engine, chat("Tell me a story about a robot."))
    turn1 = engine.submit(first, GREEDY, session="c1").result()
    follow_up = turn1.text + "\n" + chat("Why is the robot sad?")
    second = first + engine.tokenize(follow_up, add_bos=False, special=False)

    reused = engine.submit(second, GREEDY, session="c1").result()
    fresh = engine.submit(second, GREEDY).result()  # a free slot with an empty cache

    assert reused.reused_tokens >= len(first) + turn1.completion_tokens // 2
    assert fresh.reused_tokens == 0
    assert reused.prompt_tokens == fresh.prompt_tokens == len(second)
    assert reused.text.strip()
    assert fresh.text.strip()


def test_a_forgotten_session_keeps_nothing_in_the_cache(
    new_engine: Callable[..., BatchedEngine],
) -> None:
    """A deleted conversation's next turn finds nothing of it cached; another's is kept."""
    engine = new_engine()
    first = prompt(engine, chat("Tell me a story about a robot."))
    for session in ("gone", "kept"):
        engine.submit(first, GREEDY, session=session).result()
    engine.forget_session("gone")
    engine.forget_session("never seen")
    again = first + engine.tokenize(chat("And then?"), add_bos=False, special=False)
    forgotten = engine.submit(again, GREEDY, session="gone").result()
    kept = engine.submit(again, GREEDY, session="kept").result()
    assert forgotten.reused_tokens == 0
    assert kept.reused_tokens >= len(first)


def test_a_reused_prompt_gives_the_reply_of_a_fresh_one(
    new_engine: Callable[..., BatchedEngine],
) -> None:
    """Reuse keeps the prefix exactly: the same greedy reply as evaluating the whole prompt.

    Turn 1's reply is left out: its cache came from one-token steps, which round differently
    from a prompt chunk. Repacked weights take a chunk's rows four at a time, so the reused
    prefix is a multiple of four tokens long: each token then goes through the same kernel.
    """
    engine = new_engine()
    first = prompt(engine, chat("Tell me a story about a robot and the sea."))[:16]
    second = first + engine.tokenize(
        "\n" + chat("And what happened next to the old robot?"), add_bos=False, special=False
    )
    engine.submit(first, Sampling(max_tokens=1), session="c1").result()

    reused = engine.submit(second, GREEDY, session="c1").result()
    fresh = engine.submit(second, GREEDY).result()
    assert (reused.reused_tokens, fresh.reused_tokens) == (16, 0)
    assert same_reply(reused, fresh)


def test_pieces_add_up_to_the_text_and_come_from_the_decode_thread(
    engine: BatchedEngine,
) -> None:
    pieces: list[str] = []
    threads: set[str] = set()

    def on_piece(piece: str) -> None:
        pieces.append(piece)
        threads.add(threading.current_thread().name)

    sampling = Sampling(max_tokens=40, seed=7)
    completion = engine.submit(prompt(engine, chat("Tell me a joke.")), sampling, on_piece=on_piece)
    result = completion.result()
    assert "".join(pieces) == result.text
    assert result.completion_tokens > 0
    assert threads == {"llm-engine"}
    assert result.first_token_seconds is not None
    assert 0 < result.first_token_seconds <= result.seconds


def test_a_stop_sequence_ends_the_reply_before_it(engine: BatchedEngine) -> None:
    pieces: list[str] = []
    sampling = Sampling(max_tokens=120, temperature=0, stop=("\n",))
    result = engine.submit(
        prompt(engine, chat("Tell me a story.")), sampling, on_piece=pieces.append
    ).result()
    assert result.finish_reason == "stop"
    assert "\n" not in result.text
    assert result.text.strip()
    assert result.completion_tokens < sampling.max_tokens
    assert "".join(pieces) == result.text


def test_max_tokens_ends_the_reply_with_length(engine: BatchedEngine) -> None:
    result = engine.submit(
        prompt(engine, chat("Tell me a story.")), Sampling(max_tokens=5)
    ).result()
    assert (result.finish_reason, result.completion_tokens) == ("length", 5)


def test_characters_split_over_byte_tokens_arrive_whole(engine: BatchedEngine) -> None:
    # Gemma writes 🧌 and ꙮ as one token per UTF-8 byte; the repeat penalty would stop the copy.
    text = chat("Say 🧌 ꙮ three times.") + " 🧌 ꙮ 🧌 ꙮ 🧌 ꙮ\n" + chat("Again.")
    pieces: list[str] = []
    sampling = Sampling(max_tokens=24, temperature=0, repeat_penalty=1.0)
    result = engine.submit(prompt(engine, text), sampling, on_piece=pieces.append).result()
    assert "🧌" in result.text
    assert "ꙮ" in result.text
    assert "\ufffd" not in result.text
    assert "".join(pieces) == result.text


@pytest.mark.parametrize(
    ("chunks", "stop", "released", "text"),
    [
        # a character split over pieces waits for its last byte
        (["Gr", b"\xc3", b"\xbc\xc3\x9fe"], (), ["Gr", "", "üße"], "Grüße"),
        ([b"\xf0", b"\x9f", b"\xa7", b"\x8c!"], (), ["", "", "", "🧌!"], "🧌!"),
        # a tail that may begin a stop sequence waits, and goes once it cannot
        ([" Hi", "\nHu", "man:", " more"], ("\nHuman:",), [" Hi", "", ""], " Hi"),
        ([" Hi", "\nHu", "ge"], ("\nHuman:",), [" Hi", "", "\nHuge"], " Hi\nHuge"),
        # the first of several stop sequences ends the text, also inside a piece
        (["a. b! c"], ("!", "."), ["a"], "a"),
        (["ab", "cd"], ("bc",), ["a", ""], "a"),
    ],
)
def test_reply_text_holds_back_partial_characters_and_stop_sequences(
    chunks: list[str | bytes], stop: tuple[str, ...], released: list[str], text: str
) -> None:
    reply = _ReplyText(stop)
    pieces = []
    for chunk in chunks:
        if reply.stopped:
            break
        pieces.append(reply.feed(chunk.encode() if isinstance(chunk, str) else chunk))
    assert pieces == released
    if not reply.stopped:
        pieces.append(reply.flush())
    assert reply.text == text
    assert "".join(pieces) == text


def test_no_more_than_n_parallel_run_and_the_queue_is_fifo(
    new_engine: Callable[..., BatchedEngine],
) -> None:
    engine = new_engine(n_parallel=2)
    started: list[str] = []

    def first_piece(name: str) -> Callable[[str], None]:
        return lambda _piece: None if name in started else started.append(name)

    lengths = {"a": 8, "b": 24, "c": 8, "d": 8}
    futures = {
        name: engine.submit(
            prompt(engine, chat("Tell me a story.")),
            Sampling(max_tokens=n, temperature=0),
            on_piece=first_piece(name),
        )
        for name, n in lengths.items()
    }
    assert all(future.result().completion_tokens == lengths[n] for n, future in futures.items())
    assert engine.stats.peak_running == 2
    assert started == ["a", "b", "c", "d"]


def test_a_cancelled_reply_stops_and_the_others_go_on(engine: BatchedEngine) -> None:
    cancel = threading.Event()
    pieces: list[str] = []
    five = threading.Event()

    def on_piece(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 5:
            five.set()

    long = engine.submit(
        prompt(engine, chat("Tell me a long story.")),
        Sampling(max_tokens=200, temperature=0),
        on_piece=on_piece,
        cancel=cancel,
    )
    other = engine.submit(prompt(engine, chat("Tell me a story.")), GREEDY)
    assert five.wait(30)
    cancel.set()
    seen = len(pieces)
    with pytest.raises(EngineCancelled):
        long.result(timeout=30)
    assert len(pieces) - seen <= 2  # the step under way may still add one
    assert other.result(timeout=30).completion_tokens > 0


def test_cancel_stops_a_long_prompt_in_the_middle(engine: BatchedEngine) -> None:
    text = "The robot walked along the beach and counted the waves. " * 140
    long_prompt = prompt(engine, text)
    assert 1400 < len(long_prompt) < 2000
    before = engine.stats
    cancel = threading.Event()
    future = engine.submit(long_prompt, GREEDY, cancel=cancel)
    while engine.stats.running == 0:
        time.sleep(0.005)
    time.sleep(0.05)  # inside the first 512-token chunk, which takes about a second here
    cancel.set()
    with pytest.raises(EngineCancelled):
        future.result(timeout=30)
    after = engine.stats
    assert after.prompt_tokens_evaluated - before.prompt_tokens_evaluated < len(long_prompt)
    assert after.aborted_decodes > before.aborted_decodes  # the abort callback stopped it
    assert engine.submit(prompt(engine, chat("Hi!")), Sampling(max_tokens=4)).result()


def test_a_prompt_longer_than_the_context_fails_alone(engine: BatchedEngine) -> None:
    too_long = [engine.token_bos()] + [236764] * 2048
    with pytest.raises(EngineError, match="prompt of 2049 tokens does not fit the context of 2048"):
        engine.submit(too_long, GREEDY).result(timeout=1)
    assert engine.submit(prompt(engine, chat("Hi!")), Sampling(max_tokens=4)).result()


def test_a_full_context_evicts_idle_caches_then_fails_the_youngest(
    new_engine: Callable[..., BatchedEngine],
) -> None:
    engine = new_engine(n_ctx=256, n_parallel=2, kv_size=256)
    words = engine.tokenize("one two three four " * 100, add_bos=False, special=False)

    def sized(n: int) -> list[int]:
        return [engine.token_bos(), *words[: n - 1]]

    ten, forty = Sampling(max_tokens=10, temperature=0), Sampling(max_tokens=40, temperature=0)
    engine.submit(sized(100), ten, session="a").result()  # 109 cells: the last token is not in
    # 150 more cells do not fit beside session a's 109: its idle cache goes.
    assert engine.submit(sized(150), ten).result().completion_tokens == 10
    assert engine.submit(sized(100), ten, session="a").result().reused_tokens == 0

    # Two prompts of 120 fill 240 cells (the second partly from session a's cache); eight steps
    # later the cache is full.
    older = engine.submit(sized(120), forty)
    younger = engine.submit(sized(120), forty)
    with pytest.raises(EngineError, match="KV cache of 256 cells is full"):
        younger.result(timeout=60)
    assert older.result(timeout=60).finish_reason == "length"


def test_by_default_every_sequence_has_its_whole_context(
    new_engine: Callable[..., BatchedEngine],
) -> None:
    engine = new_engine(n_ctx=256, n_parallel=2)
    assert engine.kv_size == 512
    words = engine.tokenize("one two three four " * 100, add_bos=False, special=False)
    full = [engine.token_bos(), *words[:199]]
    forty = Sampling(max_tokens=40, temperature=0)
    # Two replies of 240 tokens each: with 256 cells in all, one of them failed above.
    replies = [engine.submit(full, forty, session=name) for name in "ab"]
    assert [reply.result(timeout=60).completion_tokens for reply in replies] == [40, 40]


def test_close_fails_the_running_and_queued_requests(
    new_engine: Callable[..., BatchedEngine],
) -> None:
    before = set(threading.enumerate())
    engine = new_engine(n_parallel=1)
    hi = prompt(engine, "Hi")
    started = threading.Event()
    futures = [
        engine.submit(
            prompt(engine, chat(q)),
            Sampling(max_tokens=200),
            on_piece=lambda _piece: started.set(),
        )
        for q in QUESTIONS[:3]
    ]
    assert started.wait(30)
    engine.close()
    for future in futures:
        with pytest.raises(EngineError, match="closed"):
            future.result(timeout=1)
    assert set(threading.enumerate()) <= before
    with pytest.raises(EngineError, match="closed"):
        engine.submit(hi, GREEDY).result(timeout=1)
    with pytest.raises(EngineError, match="closed"):
        engine.tokenize("Hi", add_bos=True, special=False)


def test_throughput_report(engine: BatchedEngine, model_path: str) -> None:
    """Prints tokens/s: 1 vs 4 sequences, and the engine vs the high-level API (not asserted)."""
    sampling = Sampling(max_tokens=48, temperature=0)
    prompts = [prompt(engine, chat(q)) for q in QUESTIONS]

    def rate(run: Callable[[], list[int]]) -> float:
        start = time.perf_counter()
        tokens = sum(run())
        return tokens / (time.perf_counter() - start)

    def one_by_one() -> list[int]:
        return [engine.submit(p, sampling).result().completion_tokens for p in prompts]

    def four_at_once() -> list[int]:
        futures = [engine.submit(p, sampling) for p in prompts]
        return [future.result().completion_tokens for future in futures]

    def engine_one() -> list[int]:
        return [engine.submit(prompts[0], sampling).result().completion_tokens]

    llama = llama_cpp.Llama(model_path, n_ctx=2048, verbose=False)

    def high_level() -> list[int]:
        reply = llama.create_completion(
            prompts[0], max_tokens=sampling.max_tokens, temperature=0, repeat_penalty=1.2
        )
        return [reply["usage"]["completion_tokens"]]

    try:
        high_level()  # warm-up, as the engine's is behind it
        rates = {
            "1 sequence at a time": rate(one_by_one),
            "4 sequences at once": rate(four_at_once),
        }
        # Interleaved, best of two: other processes share the cores.
        for name, run in [("engine", engine_one), ("Llama.create_completion", high_level)] * 2:
            rates[name] = max(rates.get(name, 0.0), rate(run))
    finally:
        llama.close()
    for name, value in rates.items():
        print(f"{name}: {value:.1f} tokens/s")
    print(f"engine / Llama: {rates['engine'] / rates['Llama.create_completion']:.2f}")


def test_model_path_must_exist(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="model file not found"):
        BatchedEngine(str(tmp_path / "missing.gguf"))
