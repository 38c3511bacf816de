"""The llama.cpp backend on the real offline Gemma 3 270M GGUF, and its Llama-2 prompt."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import llama_cpp
import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from marvin_faust.conversation import build_prompt
from marvin_faust.llm import ModelLoadError, ModelTimeout, create_backend
from marvin_faust.llm.llamacpp import (
    PLAIN_TEMPLATE,
    STOP_SEQUENCES,
    LlamaCppBackend,
    LlamaCppChatModel,
    LlamaCppCompletionLLM,
    choose_prompt_format,
    llama2_chat,
)
from marvin_faust.settings import PERSONA, load_settings

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def gemma(models_dir):
    backend = create_backend(
        load_settings(_env_file=None, backend="llamacpp", data_dir=models_dir, seed=7)
    )
    backend.load()
    return backend


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


def test_gpu_offload_and_sampling_settings_reach_llama_cpp(gemma):
    # n_gpu_layers=-1 means "all layers": llama-cpp-python passes it on as INT_MAX. On this
    # CPU-only build llama.cpp ignores it; with a CUDA build every layer goes to the GPU.
    assert gemma.llama_kwargs["n_gpu_layers"] == -1
    assert gemma.llama.model_params.n_gpu_layers == 0x7FFFFFFF
    assert gemma.llama.n_ctx() == 2048
    model = gemma.chat_model
    assert (model.max_tokens, model.top_p, model.top_k) == (250, 0.95, 150)
    assert (model.temperature, model.repeat_penalty) == (0.7, 1.2)


def test_gpu_layer_count_is_configurable(models_dir):
    backend = create_backend(
        load_settings(_env_file=None, backend="llamacpp", data_dir=models_dir, n_gpu_layers=12)
    )
    assert backend.llama_kwargs["n_gpu_layers"] == 12


def test_offline_model_loads_with_the_plain_format(gemma):
    assert gemma.model_file.name == "gemma-3-270m-q4_k_m.gguf"
    assert "tokenizer.chat_template" not in gemma.llama.metadata
    assert gemma.prompt_format == "plain"
    assert gemma.count_tokens("Hello there") == len(gemma.llama.tokenize(b"Hello there", False))


async def test_generates_a_reply_without_chat_markup(gemma):
    prompt = build_prompt(PERSONA, [HumanMessage("Hi"), AIMessage("What now?")], "Who are you?")
    generation = await gemma.generate(prompt, timeout=120)
    assert generation.text
    assert "[INST]" not in generation.text and "<<SYS>>" not in generation.text
    assert "Human:" not in generation.text  # the stop sequence ended the turn
    assert 0 < generation.completion_tokens <= 250 + 5
    assert generation.first_token_seconds is not None
    assert generation.first_token_seconds <= generation.seconds


async def test_the_reply_streams_piece_by_piece_on_the_event_loop(gemma, monkeypatch):
    loop_thread = threading.get_ident()
    pieces: list[tuple[str, int]] = []
    story = [HumanMessage("Tell me a long story about a robot.")]
    generation = await gemma.generate(
        story, timeout=120, on_token=lambda p: pieces.append((p, threading.get_ident()))
    )
    assert len(pieces) > 1
    assert "".join(p for p, _ in pieces).strip() == generation.text
    assert {thread for _, thread in pieces} == {loop_thread}
    assert generation.finish_reason in ("stop", "length")
    # A reply cut at max_tokens says so.
    monkeypatch.setattr(gemma.chat_model, "max_tokens", 4)
    cut = await gemma.generate(story, timeout=120, on_token=lambda p: None)
    assert cut.finish_reason == "length"
    assert cut.completion_tokens <= 4 + 2


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


async def test_a_timeout_stops_the_generation_and_frees_the_model(gemma):
    with pytest.raises(ModelTimeout):
        await gemma.generate([HumanMessage("Count from one to one thousand.")], timeout=0.05)
    # the lock is free again: the next call completes
    generation = await gemma.generate([HumanMessage("Hi")], timeout=120)
    assert generation.seconds < 120


def test_langchain_chat_model_invoke_reports_usage(gemma):
    model: LlamaCppChatModel = gemma.chat_model
    message = model.invoke([SystemMessage(PERSONA), HumanMessage("Hello")])
    assert isinstance(message, AIMessage)
    assert message.usage_metadata["output_tokens"] >= 1


# --- The Llama-2 chat format: langchain-experimental's Llama2Chat over create_completion ---

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


class FakeLlama:
    """A stand-in ``llama_cpp.Llama``: a Llama-2-like byte tokenizer, and a streamed reply."""

    BOS, EOS = 1, 2
    SPECIAL: ClassVar[dict[bytes, int]] = {b"<s>": BOS, b"</s>": EOS}
    reply: tuple[str, ...] = ("Go", " away", ", I'm", " busy", ".")
    delay = 0.0
    finish_reason = "stop"
    instances: ClassVar[list[FakeLlama]] = []  # the test reads the one that _load made

    def __init__(self, model_path: str, **kwargs: Any) -> None:
        self.metadata: dict[str, str] = {}
        self.tokenized: list[tuple[bytes, bool, bool]] = []
        self.completions: list[dict[str, Any]] = []
        self.closed = threading.Event()
        FakeLlama.instances.append(self)

    def token_bos(self) -> int:
        return self.BOS

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        self.tokenized.append((text, add_bos, special))
        tokens = [self.BOS] if add_bos else []
        for part in re.split(rb"(</?s>)", text) if special else [text]:
            if part in self.SPECIAL:
                tokens.append(self.SPECIAL[part])
            else:
                tokens.extend(byte + 3 for byte in part)
        return tokens

    def detokenize(self, tokens: list[int]) -> str:
        names = {token: text for text, token in self.SPECIAL.items()}
        return b"".join(names.get(t) or bytes([t - 3]) for t in tokens).decode("utf-8")

    def create_completion(self, prompt: list[int], **kwargs: Any) -> Iterator[dict[str, Any]]:
        self.completions.append({"prompt": prompt, **kwargs})
        return self._stream()

    def _stream(self) -> Iterator[dict[str, Any]]:
        try:
            for text in self.reply:
                time.sleep(self.delay)
                yield {"choices": [{"text": text, "finish_reason": None}]}
            # llama-cpp-python ends a stream with a chunk that says why
            yield {"choices": [{"text": "", "finish_reason": self.finish_reason}]}
        finally:
            self.closed.set()

    def create_chat_completion(self, **kwargs: Any) -> Any:
        raise AssertionError("the llama-2 format must not use llama-cpp-python's chat format")


@pytest.fixture
def fake_llama2(monkeypatch) -> LlamaCppBackend:
    """A loaded backend whose ``auto`` format resolves to llama-2, on a :class:`FakeLlama`."""
    monkeypatch.setattr(llama_cpp, "Llama", FakeLlama)
    monkeypatch.setattr(FakeLlama, "instances", [])
    backend = LlamaCppBackend(lambda: Path("llama-2-7b-chat.Q4_K_M.gguf"))
    backend.load()
    return backend


def test_llama2_chat_renders_metas_format():
    rendered: list[str] = []

    class Recorder(LlamaCppCompletionLLM):
        def _call(self, prompt: str, *args: Any, **kwargs: Any) -> str:
            rendered.append(prompt)
            return "Sigh."

    chat = llama2_chat(Recorder(llama=None))
    assert chat.invoke(TWO_TURNS).content == "Sigh."
    assert rendered == [TWO_TURNS_PROMPT]
    assert meta_reference(TWO_TURNS) == TWO_TURNS_PROMPT
    for dialog in (TWO_TURNS[:2], [*TWO_TURNS, AIMessage("Life."), HumanMessage("Oh.")]):
        chat.invoke(dialog)
        assert rendered[-1] == meta_reference(dialog)


async def test_llama2_backend_completes_metas_prompt_as_the_chat_path_samples(fake_llama2):
    assert fake_llama2.prompt_format == "llama-2"
    (llama,) = FakeLlama.instances
    # Meta strips every message: the stray spaces do not reach the prompt
    prompt = [
        SystemMessage(PERSONA + "\n"),
        HumanMessage(" Hi"),
        AIMessage("Go away"),
        HumanMessage("Why? "),
    ]
    generation = await fake_llama2.generate(prompt, timeout=10)

    assert generation.text == "Go away, I'm busy."
    assert generation.completion_tokens == len(generation.text.encode())  # a byte tokenizer
    assert generation.first_token_seconds is not None
    assert 0 < generation.first_token_seconds <= generation.seconds
    # <s> and </s> in the rendered text are the model's BOS and EOS, and no BOS is added twice
    assert (TWO_TURNS_PROMPT.encode(), False, True) in llama.tokenized
    (completion,) = llama.completions
    tokens = completion.pop("prompt")
    assert llama.detokenize(tokens) == TWO_TURNS_PROMPT
    assert tokens[:1] == [FakeLlama.BOS] and tokens.count(FakeLlama.BOS) == 2
    assert tokens.count(FakeLlama.EOS) == 1
    assert completion.pop("stream") is True
    chat_request = LlamaCppChatModel(llama=llama)._request(TWO_TURNS, None)
    del chat_request["messages"]
    assert completion == chat_request
    assert completion["stop"] == STOP_SEQUENCES


async def test_llama2_backend_streams_each_piece_and_the_finish_reason(fake_llama2, monkeypatch):
    (llama,) = FakeLlama.instances
    pieces: list[str] = []
    generation = await fake_llama2.generate(TWO_TURNS, timeout=10, on_token=pieces.append)
    assert pieces == list(FakeLlama.reply)
    assert generation.finish_reason == "stop"
    monkeypatch.setattr(llama, "finish_reason", "length")
    generation = await fake_llama2.generate(TWO_TURNS, timeout=10, on_token=pieces.append)
    assert generation.finish_reason == "length"


def test_completion_llm_adds_bos_only_when_the_prompt_lacks_it():
    llama = FakeLlama("any.gguf")
    llm = LlamaCppCompletionLLM(llama=llama)
    assert llm.invoke("Hello") == "Go away, I'm busy."
    assert llm.invoke("<s>Hello") == "Go away, I'm busy."
    first, second = (completion["prompt"] for completion in llama.completions)
    assert first == second == [FakeLlama.BOS, *(byte + 3 for byte in b"Hello")]


async def test_llama2_timeout_stops_the_completion_and_frees_the_model(fake_llama2, monkeypatch):
    (llama,) = FakeLlama.instances
    monkeypatch.setattr(llama, "delay", 0.05)
    monkeypatch.setattr(llama, "reply", ("tick",) * 1000)
    with pytest.raises(ModelTimeout):
        await fake_llama2.generate(TWO_TURNS, timeout=0.2)
    assert await asyncio.to_thread(llama.closed.wait, 5)  # the stream was closed mid-reply
    monkeypatch.setattr(llama, "reply", ("Sigh.",))
    generation = await fake_llama2.generate(TWO_TURNS, timeout=10)
    assert generation.text == "Sigh."


async def test_llama2_format_generates_on_the_real_model(models_dir, monkeypatch):
    # Gemma is no Llama-2 model: this shows the completion path runs on llama.cpp, not quality.
    # Given TWO_TURNS Gemma mostly ends its reply at once, so it is asked for a story.
    backend = create_backend(
        load_settings(
            _env_file=None,
            backend="llamacpp",
            data_dir=models_dir,
            prompt_format="llama-2",
            max_tokens=24,
            seed=7,
        )
    )
    backend.load()
    assert backend.prompt_format == "llama-2"
    assert type(backend.chat_model).__name__ == "Llama2Chat"
    tokens: list[str] = []
    real_stream = LlamaCppCompletionLLM._stream

    def counting_stream(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for piece in real_stream(self, *args, **kwargs):
            tokens.append(piece.text)
            yield piece

    monkeypatch.setattr(LlamaCppCompletionLLM, "_stream", counting_stream)
    story = [SystemMessage(PERSONA), HumanMessage("Tell me a long story.")]
    generation = await backend.generate(story, timeout=120)
    assert len(tokens) > 1  # streamed token by token
    assert generation.text == "".join(tokens).strip()
    assert 0 < generation.completion_tokens <= 24 + 5
    assert generation.first_token_seconds is not None
    assert generation.first_token_seconds < generation.seconds
