"""llama.cpp through LangChain.

Why our own LangChain chat model instead of ``langchain_community.chat_models.ChatLlamaCpp``:
langchain-community is being sunset (importing it warns that it is unmaintained) and its wrapper
is frozen. :class:`LlamaCppChatModel` is a small ``BaseChatModel`` over
``llama_cpp.Llama.create_chat_completion`` with streaming, so the agent speaks LangChain
messages while the dependency we rely on is llama-cpp-python itself.

Prompt format (``MARVIN_PROMPT_FORMAT``):

- ``template``: the chat template in the GGUF's metadata;
- ``llama-2``: ``[INST] <<SYS>>`` format, for Llama-2 chat models (they ship no template);
- ``plain``: an explicit ``Human:`` / ``Marvin:`` transcript, for base models such as the
  offline Gemma 3 270M. Without it llama-cpp-python silently falls back to the Llama-2 format
  and a base model then writes ``[INST]`` into its replies;
- ``auto`` picks the first that fits, in that order.

Stop sequences end a reply where its turn ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict

from .base import ChatBackend, Generation, ModelError, ModelLoadError

STOP_SEQUENCES = ["\nHuman:", "Human:", "\nMarvin:", "[INST]", "<end_of_turn>", "</s>"]

# Rendered by llama-cpp-python's Jinja2ChatFormatter; bos_token is ours to place.
PLAIN_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message.role == 'system' %}{{ message.content }}\n\n"
    "{% elif message.role == 'user' %}Human: {{ message.content }}\n"
    "{% else %}Marvin: {{ message.content }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Marvin:{% endif %}"
)

_ROLES = {"system": "system", "human": "user", "ai": "assistant"}


def to_openai_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    return [{"role": _ROLES.get(m.type, "user"), "content": str(m.content)} for m in messages]


def choose_prompt_format(requested: str, has_template: bool, model_name: str) -> str:
    """Resolve ``auto``; refuse ``template`` for a GGUF that has none."""
    if requested == "template" and not has_template:
        raise ModelLoadError(
            f"MARVIN_PROMPT_FORMAT=template but {model_name} has no chat template in its metadata"
        )
    if requested != "auto":
        return requested
    if has_template:
        return "template"
    name = model_name.lower()
    if "llama-2" in name and "chat" in name:
        return "llama-2"
    return "plain"


class LlamaCppChatModel(BaseChatModel):
    """A LangChain chat model over one loaded ``llama_cpp.Llama``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    llama: Any
    max_tokens: int = 250
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 150
    repeat_penalty: float = 1.2
    stop: list[str] = STOP_SEQUENCES

    @property
    def _llm_type(self) -> str:
        return "llama-cpp-python"

    def _request(self, messages: list[BaseMessage], stop: list[str] | None) -> dict[str, Any]:
        return {
            "messages": to_openai_messages(messages),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repeat_penalty": self.repeat_penalty,
            "stop": [*self.stop, *(stop or [])],
        }

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        response = self.llama.create_chat_completion(**self._request(messages, stop))
        choice = response["choices"][0]
        message = AIMessage(
            content=(choice["message"].get("content") or "").strip(),
            usage_metadata={
                "input_tokens": response["usage"]["prompt_tokens"],
                "output_tokens": response["usage"]["completion_tokens"],
                "total_tokens": response["usage"]["total_tokens"],
            },
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in self.llama.create_chat_completion(
            **self._request(messages, stop), stream=True
        ):
            delta = chunk["choices"][0]["delta"].get("content")
            if delta:
                piece = ChatGenerationChunk(message=AIMessageChunk(content=delta))
                if run_manager:
                    run_manager.on_llm_new_token(delta, chunk=piece)
                yield piece


class LlamaCppBackend(ChatBackend):
    name = "llamacpp"

    def __init__(
        self,
        locate_model: Callable[[], Path],
        *,
        prompt_format: str = "auto",
        n_ctx: int = 2048,
        n_gpu_layers: int = -1,
        n_threads: int | None = None,
        seed: int = -1,
        sampling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.locate_model = locate_model
        self.model_file: Path | None = None
        self.requested_format = prompt_format
        self.prompt_format: str | None = None
        self.llama_kwargs: dict[str, Any] = {
            "n_ctx": n_ctx,
            "n_gpu_layers": n_gpu_layers,
            "n_threads": n_threads,
            "seed": seed,
            "verbose": False,
        }
        self.sampling = sampling or {}
        self.chat_model: LlamaCppChatModel | None = None

    def _load(self) -> None:
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as exc:
            raise ModelLoadError(f"llama-cpp-python is not importable: {exc}") from exc
        self.model_file = self.locate_model()
        try:
            llama = Llama(model_path=str(self.model_file), **self.llama_kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"could not load model {self.model_file}: {exc}") from exc
        has_template = "tokenizer.chat_template" in llama.metadata
        self.prompt_format = choose_prompt_format(
            self.requested_format, has_template, self.model_file.name
        )
        if self.prompt_format == "plain":
            llama.chat_handler = Jinja2ChatFormatter(
                template=PLAIN_TEMPLATE,
                bos_token=_token_text(llama, llama.token_bos()),
                eos_token=_token_text(llama, llama.token_eos()),
            ).to_chat_handler()
        elif self.prompt_format == "llama-2":
            llama.chat_format = "llama-2"
        self.chat_model = LlamaCppChatModel(llama=llama, **self.sampling)

    @property
    def llama(self) -> Any:
        if self.chat_model is None:
            raise ModelError("llama.cpp model is not loaded")
        return self.chat_model.llama

    def count_tokens(self, text: str) -> int:
        # Tokenizing reads only the vocabulary, not the decoding context the lock guards.
        return len(self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def _generate(self, messages: Sequence[BaseMessage], cancel: threading.Event) -> Generation:
        assert self.chat_model is not None
        started = time.perf_counter()
        first_token: float | None = None
        pieces: list[str] = []
        for chunk in self.chat_model.stream(list(messages)):
            if cancel.is_set():
                break  # closing the stream stops llama.cpp mid-reply
            if first_token is None:
                first_token = time.perf_counter() - started
            pieces.append(str(chunk.content))
        elapsed = time.perf_counter() - started
        if cancel.is_set():
            raise ModelError("generation cancelled")
        text = "".join(pieces).strip()
        return Generation(
            text=text,
            completion_tokens=self.count_tokens(text),
            seconds=elapsed,
            first_token_seconds=first_token,
        )


def _token_text(llama: Any, token: int) -> str:
    return llama.detokenize([token], special=True).decode("utf-8", errors="ignore")
