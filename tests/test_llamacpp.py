"""The llama.cpp backend on the real offline Gemma 3 270M GGUF."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from marvin_faust.conversation import build_prompt
from marvin_faust.llm import ModelLoadError, ModelTimeout, create_backend
from marvin_faust.llm.llamacpp import PLAIN_TEMPLATE, LlamaCppChatModel, choose_prompt_format
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
