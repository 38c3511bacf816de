"""The llama.cpp backend on the real offline Gemma 3 270M GGUF, and its Llama-2 prompt."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, ClassVar

import llama_cpp
import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from marvin_faust.conversation import build_prompt, history_window, make_turn
from marvin_faust.llm import ModelError, ModelLoadError, ModelTimeout, create_backend
from marvin_faust.llm import llamacpp as llamacpp_module
from marvin_faust.llm.engine import Completion, EngineCancelled, EngineStats, Sampling
from marvin_faust.llm.llamacpp import (
    PLAIN_TEMPLATE,
    STOP_SEQUENCES,
    LlamaCppBackend,
    LlamaCppLLM,
    TemplateChatModel,
    choose_prompt_format,
    llama2_chat,
)
from marvin_faust.settings import PERSONA, load_settings

pytestmark = pytest.mark.model

STORY = [HumanMessage("Tell me a long story about a robot.")]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


def llamacpp_backend(models_dir: Path, **settings: Any) -> LlamaCppBackend:
    backend = create_backend(
        load_settings(_env_file=None, backend="llamacpp", data_dir=models_dir, **settings)
    )
    assert isinstance(backend, LlamaCppBackend)
    return backend


@pytest.fixture(scope="module")
def gemma(models_dir):
    backend = llamacpp_backend(models_dir, seed=7, parallel=4)
    backend.load()
    yield backend
    backend.close()


async def until_idle(backend: LlamaCppBackend) -> EngineStats:
    """The engine's stats once nothing runs or waits (what a cancelled reply left behind)."""
    for _ in range(600):
        stats = backend.engine.stats
        if stats.running == stats.waiting == 0:
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"the engine is still busy: {backend.engine.stats}")


@pytest.mark.parametrize(
    ("requested", "has_template", "name", "chosen"),
    [
        ("auto", True, "gemma-3-270m-it.gguf", "template"),
        ("auto", False, "llama-2-7b-chat.Q4_K_M.gguf", "llama-2"),
        ("auto", False, "gemma-3-270m-q4_k_m.gguf", "plain"),
        ("auto", False, "llama-2-7b.Q4_K_M.gguf", "plain"),  # a base Llama-2: no chat format
        ("plain", True, "anything.gguf", "plain"),
        ("llama-2", False, "anything.gguf", "llama-2"),
    ],
)
def test_prompt_format_choice(requested, has_template, name, chosen):
    assert choose_prompt_format(requested, has_template, name) == chosen


def test_template_format_needs_a_template_in_the_gguf():
    with pytest.raises(ModelLoadError, match="has no chat template"):
        choose_prompt_format("template", False, "gemma.gguf")


def test_plain_template_renders_an_explicit_transcript():
    formatter = Jinja2ChatFormatter(template=PLAIN_TEMPLATE, bos_token="<bos>", eos_token="<eos>")
    rendered = formatter(
        messages=[
            {"role": "system", "content": "Be bored."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Sigh."},
            {"role": "user", "content": "Why?"},
        ]
    )
    assert rendered.prompt == "<bos>Be bored.\n\nHuman: Hi\nMarvin: Sigh.\nHuman: Why?\nMarvin:"


def test_gpu_offload_and_context_settings_reach_llama_cpp(models_dir, monkeypatch):
    # n_gpu_layers=-1 means "all layers"; on this CPU-only build llama.cpp ignores it, with a
    # CUDA build every layer goes to the GPU. Read what llama.cpp is really given.
    given: list[int] = []
    load = llama_cpp.llama_model_load_from_file

    def recording_load(path: bytes, params: Any) -> Any:
        given.append(params.n_gpu_layers)
        return load(path, params)

    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", recording_load)
    for settings, layers in (({}, -1), ({"n_gpu_layers": 12}, 12)):
        backend = llamacpp_backend(models_dir, n_ctx=1024, parallel=2, **settings)
        backend.load()
        try:
            assert given[-1] == layers
            assert backend.engine.n_ctx == 1024
            assert backend.parallel == backend.engine_options["n_parallel"] == 2
        finally:
            backend.close()


def test_sampling_settings_reach_every_reply(gemma):
    llm = gemma.chat_model.llm
    assert (llm.max_tokens, llm.top_p, llm.top_k) == (250, 0.95, 150)
    assert (llm.temperature, llm.repeat_penalty, llm.seed) == (0.7, 1.2, 7)


def test_offline_model_loads_with_the_plain_format(gemma):
    assert gemma.model_file.name == "gemma-3-270m-q4_k_m.gguf"
    assert "tokenizer.chat_template" not in gemma.engine.metadata
    assert gemma.prompt_format == "plain"
    assert isinstance(gemma.chat_model, TemplateChatModel)
    tokens = gemma.engine.tokenize("Hello there", add_bos=False, special=False)
    assert gemma.count_tokens("Hello there") == len(tokens) > 0


def test_the_prompt_is_the_plain_transcript_after_one_bos(gemma):
    llm: LlamaCppLLM = gemma.chat_model.llm
    text = gemma.chat_model.render([SystemMessage("Be bored."), HumanMessage("Hi")])
    assert text.endswith("Be bored.\n\nHuman: Hi\nMarvin:")
    tokens = llm.prompt_tokens(text)
    bos = gemma.engine.token_bos()
    assert tokens[0] == bos and tokens.count(bos) == 1


def test_last_tokens_cuts_the_text_at_a_token_boundary(gemma):
    text = "Life? Don't talk to me about life. Here I am, brain the size of a planet. \u00e9t\u00e9"
    total = gemma.count_tokens(text)
    assert gemma.last_tokens(text, total) == text
    assert gemma.last_tokens(text, 0) == ""
    for count in range(1, total):
        end = gemma.last_tokens(text, count)
        assert end and text.endswith(end), (count, end)
        assert gemma.count_tokens(end) <= count + 1, (count, end)  # may retokenize differently
    # The history window keeps the end of a reply over the budget, within the budget.
    window = history_window([make_turn("AI", text, 0, None)], 5, gemma, "AI")
    assert window[0] == HumanMessage("") and text.endswith(str(window[1].content))
    assert 0 < gemma.count_tokens(str(window[1].content)) <= 5


async def test_generates_a_reply_without_chat_markup(gemma):
    prompt = build_prompt(PERSONA, [HumanMessage("Hi"), AIMessage("What now?")], "Who are you?")
    generation = await gemma.generate(prompt, timeout=120)
    assert generation.text
    assert "[INST]" not in generation.text and "<<SYS>>" not in generation.text
    assert "Human:" not in generation.text  # the stop sequence ended the turn
    assert 0 < generation.completion_tokens <= 250
    assert generation.first_token_seconds is not None
    assert generation.first_token_seconds <= generation.seconds


async def test_the_reply_streams_piece_by_piece_on_the_event_loop(gemma, monkeypatch):
    loop_thread = threading.get_ident()
    pieces: list[tuple[str, int]] = []
    generation = await gemma.generate(
        STORY, timeout=120, on_token=lambda p: pieces.append((p, threading.get_ident()))
    )
    assert len(pieces) > 1
    assert "".join(p for p, _ in pieces).strip() == generation.text
    assert {thread for _, thread in pieces} == {loop_thread}
    assert generation.finish_reason in ("stop", "length")
    # A reply cut at max_tokens says so, with the engine's own token count.
    monkeypatch.setattr(gemma.chat_model.llm, "max_tokens", 4)
    cut = await gemma.generate(STORY, timeout=120, on_token=lambda p: None)
    assert cut.finish_reason == "length"
    assert cut.completion_tokens == 4


async def test_generation_does_not_block_the_event_loop(gemma):
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    generation = await gemma.generate([HumanMessage("Tell me a long story.")], timeout=120)
    elapsed = time.perf_counter() - started
    task.cancel()
    # the loop kept ticking while the model worked in its thread
    assert ticks >= int(elapsed / 0.01 * 0.3)
    assert generation.seconds > 0


async def test_several_conversations_are_decoded_together(gemma):
    before = gemma.engine.stats.peak_running
    replies = await asyncio.gather(
        *(
            gemma.generate(
                [HumanMessage(f"Tell me story number {n}.")], 120, conversation_id=f"c{n}"
            )
            for n in range(4)
        )
    )
    assert all(reply.text for reply in replies)
    assert gemma.engine.stats.peak_running == max(before, 4) == 4


async def test_a_conversations_next_turn_evaluates_only_its_new_tokens(gemma):
    first = [SystemMessage(PERSONA), HumanMessage("Hi, who are you?")]
    reply = await gemma.generate(first, timeout=120, conversation_id="reuse")
    second = [*first, AIMessage(reply.text), HumanMessage("And what do you do all day?")]
    prompt_tokens = len(gemma.chat_model.llm.prompt_tokens(gemma.chat_model.render(second)))
    before = gemma.engine.stats.prompt_tokens_evaluated
    await gemma.generate(second, timeout=120, conversation_id="reuse")
    evaluated = gemma.engine.stats.prompt_tokens_evaluated - before
    # The persona and the first exchange came from the cache: about 20 new tokens of ~100.
    assert (
        0
        < evaluated
        < prompt_tokens - len(gemma.engine.tokenize(PERSONA, add_bos=False, special=False))
    )


async def test_a_timeout_stops_prompt_evaluation_and_frees_the_slot(models_dir):
    # One slot: a timed-out reply that kept running would hold it. The prompt takes seconds to
    # evaluate on this CPU (chunks of 512 tokens), so the timeout falls inside it: cancelling
    # stops it there (llama.cpp's abort callback, or between two chunks), before any token.
    backend = llamacpp_backend(models_dir, parallel=1, n_ctx=4096)
    backend.load()
    try:
        long_prompt = [HumanMessage(" ".join(f"word{n}" for n in range(700)) + " Summarise.")]
        chat_model = backend.chat_model
        prompt_tokens = len(chat_model.llm.prompt_tokens(chat_model.render(long_prompt)))
        before = backend.engine.stats
        with pytest.raises(ModelTimeout):
            await backend.generate(long_prompt, timeout=0.3)
        after = await until_idle(backend)
        evaluated = after.prompt_tokens_evaluated - before.prompt_tokens_evaluated
        assert evaluated < prompt_tokens, after
        assert after.tokens_generated == before.tokens_generated
        generation = await backend.generate([HumanMessage("Hi")], timeout=120)
        assert generation.completion_tokens > 0
    finally:
        backend.close()


async def test_a_reader_that_stops_early_stops_the_reply(gemma, monkeypatch):
    monkeypatch.setattr(gemma.chat_model.llm, "max_tokens", 200)
    before = await until_idle(gemma)
    stream = gemma.chat_model.astream(STORY)
    async for _ in stream:
        break
    await stream.aclose()
    after = await until_idle(gemma)
    assert after.tokens_generated - before.tokens_generated < 20


def test_langchain_chat_model_invoke_reports_usage(gemma):
    model: TemplateChatModel = gemma.chat_model
    message = model.invoke([SystemMessage(PERSONA), HumanMessage("Hello")])
    assert isinstance(message, AIMessage)
    assert message.usage_metadata["output_tokens"] >= 1
    assert message.usage_metadata["input_tokens"] > len(PERSONA.split())


# --- The Llama-2 chat format: langchain-experimental's Llama2Chat over LlamaCppLLM ---

# system + human "Hi" + ai "Go away" + human "Why?", in Meta's Llama-2 chat format
TWO_TURNS = [SystemMessage(PERSONA), HumanMessage("Hi"), AIMessage("Go away"), HumanMessage("Why?")]
TWO_TURNS_PROMPT = (
    f"<s>[INST] <<SYS>>\n{PERSONA}\n<</SYS>>\n\nHi [/INST] Go away </s><s>[INST] Why? [/INST]"
)


def meta_reference(messages: list[BaseMessage], bos: str = "<s>", eos: str = "</s>") -> str:
    """Meta's ``Llama.chat_completion`` (meta-llama/llama, llama/generation.py) as text."""
    contents = [str(m.content) for m in messages]
    dialog = [f"<<SYS>>\n{contents[0]}\n<</SYS>>\n\n{contents[1]}", *contents[2:]]
    prompt = "".join(
        f"{bos}[INST] {user.strip()} [/INST] {answer.strip()} {eos}"
        for user, answer in zip(dialog[:-1:2], dialog[1::2], strict=True)
    )
    return prompt + f"{bos}[INST] {dialog[-1].strip()} [/INST]"


class FakeEngine:
    """A stand-in :class:`BatchedEngine`: a Llama-2-like byte tokenizer and a streamed reply."""

    BOS, EOS = 1, 2
    SPECIAL: ClassVar[dict[bytes, int]] = {b"<s>": BOS, b"</s>": EOS}
    reply: tuple[str, ...] = ("Go", " away", ", I'm", " busy", ".")
    delay = 0.0
    finish_reason = "stop"
    instances: ClassVar[list[FakeEngine]] = []  # the test reads the one that _load made

    def __init__(self, model_path: str, **options: Any) -> None:
        self.metadata: dict[str, str] = {}
        self.options = options
        self.tokenized: list[tuple[str, bool, bool]] = []
        self.requests: list[dict[str, Any]] = []
        self.cancels: list[threading.Event] = []
        FakeEngine.instances.append(self)

    def start(self) -> None:
        pass

    def token_bos(self) -> int:
        return self.BOS

    def token_eos(self) -> int:
        return self.EOS

    def token_text(self, token: int) -> str:
        return {self.BOS: "<s>", self.EOS: "</s>"}[token]

    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        self.tokenized.append((text, add_bos, special))
        tokens = [self.BOS] if add_bos else []
        data = text.encode()
        for part in re.split(rb"(</?s>)", data) if special else [data]:
            if part in self.SPECIAL:
                tokens.append(self.SPECIAL[part])
            else:
                tokens.extend(byte + 3 for byte in part)
        return tokens

    def detokenize(self, tokens: list[int]) -> str:
        names = {token: text for text, token in self.SPECIAL.items()}
        return b"".join(names.get(t) or bytes([t - 3]) for t in tokens).decode("utf-8")

    def submit(self, prompt: list[int], sampling: Sampling, **kwargs: Any) -> Future[Completion]:
        self.requests.append({"prompt": prompt, "sampling": sampling, **kwargs})
        self.cancels.append(kwargs["cancel"])
        future: Future[Completion] = Future()
        threading.Thread(target=self._run, args=(future, prompt, kwargs), daemon=True).start()
        return future

    def _run(self, future: Future[Completion], prompt: list[int], kwargs: dict) -> None:
        for text in self.reply:
            if kwargs["cancel"].wait(self.delay):
                future.set_exception(EngineCancelled("cancelled"))
                return
            kwargs["on_piece"](text)
        text = "".join(self.reply)
        future.set_result(Completion(text, len(text), len(prompt), 0, self.finish_reason, 0.0, 0.0))


@pytest.fixture
def fake_llama2(monkeypatch) -> LlamaCppBackend:
    """A loaded backend whose ``auto`` format resolves to llama-2, on a :class:`FakeEngine`."""
    monkeypatch.setattr(llamacpp_module, "BatchedEngine", FakeEngine)
    monkeypatch.setattr(FakeEngine, "instances", [])
    backend = LlamaCppBackend(lambda: Path("llama-2-7b-chat.Q4_K_M.gguf"), parallel=3)
    backend.load()
    return backend


def test_llama2_chat_renders_metas_format():
    rendered: list[str] = []

    class Recorder(LlamaCppLLM):
        def _call(self, prompt: str, *args: Any, **kwargs: Any) -> str:
            rendered.append(prompt)
            return "Sigh."

    chat = llama2_chat(Recorder(engine=None))
    assert chat.invoke(TWO_TURNS).content == "Sigh."
    assert rendered == [TWO_TURNS_PROMPT]
    assert meta_reference(TWO_TURNS) == TWO_TURNS_PROMPT
    for dialog in (TWO_TURNS[:2], [*TWO_TURNS, AIMessage("Life."), HumanMessage("Oh.")]):
        chat.invoke(dialog)
        assert rendered[-1] == meta_reference(dialog)


async def test_llama2_backend_completes_metas_prompt_with_the_projects_sampling(fake_llama2):
    assert fake_llama2.prompt_format == "llama-2"
    (engine,) = FakeEngine.instances
    assert engine.options["n_parallel"] == 3
    # Meta strips every message: the stray spaces do not reach the prompt
    prompt = [
        SystemMessage(PERSONA + "\n"),
        HumanMessage(" Hi"),
        AIMessage("Go away"),
        HumanMessage("Why? "),
    ]
    generation = await fake_llama2.generate(prompt, timeout=10, conversation_id="c-1")

    assert generation.text == "Go away, I'm busy."
    assert generation.completion_tokens == len(generation.text)  # the engine's count
    assert generation.first_token_seconds is not None
    assert 0 < generation.first_token_seconds <= generation.seconds
    # <s> and </s> in the rendered text are the model's BOS and EOS, and no BOS is added twice
    assert (TWO_TURNS_PROMPT, False, True) in engine.tokenized
    (request,) = engine.requests
    tokens = request["prompt"]
    assert engine.detokenize(tokens) == TWO_TURNS_PROMPT
    assert tokens[:1] == [FakeEngine.BOS] and tokens.count(FakeEngine.BOS) == 2
    assert tokens.count(FakeEngine.EOS) == 1
    # the conversation id reaches the engine through Llama2Chat: its KV cache is reused
    assert request["session"] == "c-1"
    assert request["sampling"] == Sampling(
        max_tokens=250,
        temperature=0.7,
        top_p=0.95,
        top_k=150,
        repeat_penalty=1.2,
        seed=-1,
        stop=tuple(STOP_SEQUENCES),
    )


async def test_llama2_backend_streams_each_piece_and_the_finish_reason(fake_llama2, monkeypatch):
    (engine,) = FakeEngine.instances
    pieces: list[str] = []
    generation = await fake_llama2.generate(TWO_TURNS, timeout=10, on_token=pieces.append)
    assert pieces == list(FakeEngine.reply)
    assert generation.finish_reason == "stop"
    monkeypatch.setattr(engine, "finish_reason", "length")
    generation = await fake_llama2.generate(TWO_TURNS, timeout=10, on_token=pieces.append)
    assert generation.finish_reason == "length"


def test_completion_llm_adds_bos_only_when_the_prompt_lacks_it():
    engine = FakeEngine("any.gguf")
    llm = LlamaCppLLM(engine=engine)
    assert llm.invoke("Hello") == "Go away, I'm busy."
    assert llm.invoke("<s>Hello") == "Go away, I'm busy."
    first, second = (request["prompt"] for request in engine.requests)
    assert first == second == [FakeEngine.BOS, *(byte + 3 for byte in b"Hello")]


async def test_llama2_timeout_cancels_the_engine_request(fake_llama2, monkeypatch):
    (engine,) = FakeEngine.instances
    monkeypatch.setattr(engine, "delay", 0.05)
    monkeypatch.setattr(engine, "reply", ("tick",) * 1000)
    with pytest.raises(ModelTimeout):
        await fake_llama2.generate(TWO_TURNS, timeout=0.2)
    assert engine.cancels[-1].is_set()
    monkeypatch.setattr(engine, "reply", ("Sigh.",))
    generation = await fake_llama2.generate(TWO_TURNS, timeout=10)
    assert generation.text == "Sigh."


async def test_an_engine_failure_is_a_model_error(fake_llama2, monkeypatch):
    (engine,) = FakeEngine.instances

    def fail(*args: Any, **kwargs: Any) -> Future[Completion]:
        future: Future[Completion] = Future()
        future.set_exception(llamacpp_module.EngineError("the context of 2048 tokens is full"))
        return future

    monkeypatch.setattr(engine, "submit", fail)
    with pytest.raises(ModelError, match="context of 2048 tokens is full"):
        await fake_llama2.generate(TWO_TURNS, timeout=10)


async def test_llama2_format_generates_on_the_real_model(models_dir):
    # Gemma is no Llama-2 model: this shows the completion path runs on llama.cpp, not quality.
    # Given TWO_TURNS Gemma mostly ends its reply at once, so it is asked for a story.
    backend = llamacpp_backend(models_dir, prompt_format="llama-2", max_tokens=24, seed=7)
    backend.load()
    try:
        assert backend.prompt_format == "llama-2"
        assert type(backend.chat_model).__name__ == "Llama2Chat"
        pieces: list[str] = []
        story = [SystemMessage(PERSONA), HumanMessage("Tell me a long story.")]
        generation = await backend.generate(story, timeout=120, on_token=pieces.append)
        assert len(pieces) > 1  # streamed token by token
        assert generation.text == "".join(pieces).strip()
        assert 0 < generation.completion_tokens <= 24
        assert generation.first_token_seconds is not None
        assert generation.first_token_seconds < generation.seconds
    finally:
        backend.close()
