"""llama.cpp through LangChain.

Why our own LangChain models instead of langchain-community's ``ChatLlamaCpp`` and ``LlamaCpp``:
langchain-community is being sunset (importing it warns that it is unmaintained) and its
wrappers are frozen. :class:`LlamaCppChatModel` is a small ``BaseChatModel`` over
``llama_cpp.Llama.create_chat_completion`` and :class:`LlamaCppCompletionLLM` a small ``LLM``
over ``create_completion``, both streaming, so the agent speaks LangChain messages while the
dependency we rely on is llama-cpp-python itself.

Prompt format (``MARVIN_PROMPT_FORMAT``):

- ``template``: the chat template in the GGUF's metadata;
- ``llama-2``: Meta's Llama-2 chat format, for Llama-2 chat models (they ship no template).
  langchain-experimental's ``Llama2Chat`` renders it, as in the system this project replaces,
  and :class:`LlamaCppCompletionLLM` generates from the rendered text: llama-cpp-python's own
  ``llama-2`` chat format is not Meta's (no blank line after ``<</SYS>>``, no space after
  ``[/INST]``). ``Llama2Chat`` does not stream, so tokens reach the backend by callbacks;
- ``plain``: an explicit ``Human:`` / ``Marvin:`` transcript, for base models such as the
  offline Gemma 3 270M. Without it llama-cpp-python silently falls back to the Llama-2 format
  and a base model then writes ``[INST]`` into its replies;
- ``auto`` picks the first that fits, in that order.

Stop sequences end a reply where its turn ends.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.llms import LLM
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk
from pydantic import BaseModel, ConfigDict

from .base import ChatBackend, Generation, ModelError, ModelLoadError, TokenSink

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


class LlamaCppSampling(BaseModel):
    """One loaded ``llama_cpp.Llama`` and the sampling settings of every reply from it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    llama: Any
    max_tokens: int = 250
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 150
    repeat_penalty: float = 1.2
    stop: list[str] = STOP_SEQUENCES

    def _sampling(self, stop: list[str] | None) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repeat_penalty": self.repeat_penalty,
            "stop": [*self.stop, *(stop or [])],
        }


class LlamaCppChatModel(BaseChatModel, LlamaCppSampling):
    """A LangChain chat model over ``Llama.create_chat_completion``."""

    @property
    def _llm_type(self) -> str:
        return "llama-cpp-python"

    def _request(self, messages: list[BaseMessage], stop: list[str] | None) -> dict[str, Any]:
        return {"messages": to_openai_messages(messages), **self._sampling(stop)}

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
        # BaseChatModel.stream() reports each chunk to the callbacks itself.
        for chunk in self.llama.create_chat_completion(
            **self._request(messages, stop), stream=True
        ):
            choice = chunk["choices"][0]
            delta = choice["delta"].get("content")
            if delta:
                yield ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if choice.get("finish_reason"):
                yield ChatGenerationChunk(
                    message=AIMessageChunk(content=""),
                    generation_info={"finish_reason": choice["finish_reason"]},
                )


class LlamaCppCompletionLLM(LLM, LlamaCppSampling):
    """A LangChain text-completion model over ``Llama.create_completion``, streaming.

    Special tokens in the prompt are parsed (``<s>`` / ``</s>`` are a Llama-2 model's BOS / EOS),
    and BOS is added only to a prompt that does not start with it: llama-cpp-python would add a
    second one. Pass ``cancel=<threading.Event>`` to stop between two tokens.
    """

    @property
    def _llm_type(self) -> str:
        return "llama-cpp-python-completion"

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        cancel: threading.Event | None = kwargs.get("cancel")
        tokens = self.llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        bos = self.llama.token_bos()
        if bos >= 0 and tokens[:1] != [bos]:
            tokens.insert(0, bos)
        stream = self.llama.create_completion(prompt=tokens, stream=True, **self._sampling(stop))
        try:
            for chunk in stream:
                if cancel is not None and cancel.is_set():
                    break
                choice = chunk["choices"][0]
                finish_reason = choice.get("finish_reason")
                if choice["text"] or finish_reason:
                    piece = GenerationChunk(
                        text=choice["text"],
                        generation_info={"finish_reason": finish_reason} if finish_reason else None,
                    )
                    if run_manager:
                        run_manager.on_llm_new_token(piece.text, chunk=piece)
                    yield piece
        finally:
            stream.close()  # stops llama.cpp mid-reply

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return "".join(piece.text for piece in self._stream(prompt, stop, run_manager, **kwargs))


def llama2_chat(llm: LLM) -> BaseChatModel:
    """langchain-experimental's ``Llama2Chat`` over ``llm``: Meta's Llama-2 chat format."""
    # langchain-experimental warns at import that it is being sunset: we depend on it knowingly
    # and keep that one warning out of the worker's log. It imports langchain-classic, not
    # langchain-community, so no other deprecation warning comes with it.
    warnings.filterwarnings(
        "ignore", message="`langchain-experimental` is being sunset", category=DeprecationWarning
    )
    from langchain_experimental.chat_models import Llama2Chat

    return Llama2Chat(llm=llm)


class _Relay(BaseCallbackHandler):
    """One reply's pieces as llama.cpp writes them: passes each to the backend's token sink and
    notes when the first came and why the reply ended. Fed by the chat path's stream and, as a
    LangChain callback, by the Llama-2 path (``Llama2Chat`` does not stream)."""

    def __init__(self, on_token: TokenSink) -> None:
        self.on_token = on_token
        self.started = time.perf_counter()
        self.first_token_seconds: float | None = None
        self.finish_reason = "stop"
        self.pieces: list[str] = []

    def piece(self, text: str, finish_reason: str | None) -> None:
        if finish_reason:
            self.finish_reason = finish_reason
        if not text:
            return
        if self.first_token_seconds is None:
            self.first_token_seconds = time.perf_counter() - self.started
        self.pieces.append(text)
        self.on_token(text)

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        chunk = kwargs.get("chunk")
        info = getattr(chunk, "generation_info", None) or {}
        self.piece(token, info.get("finish_reason"))


class LlamaCppBackend(ChatBackend):
    """One ``llama_cpp.Llama``, which decodes one sequence and is not thread-safe: one reply
    at a time, whatever ``MARVIN_PARALLEL`` says (``engine.BatchedEngine`` decodes several
    sequences at once and is to take its place)."""

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
        self._llama: Any = None
        # LlamaCppChatModel, or for llama-2 Llama2Chat over a LlamaCppCompletionLLM
        self.chat_model: BaseChatModel | None = None

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
        if self.prompt_format == "llama-2":
            self.chat_model = llama2_chat(LlamaCppCompletionLLM(llama=llama, **self.sampling))
        else:
            if self.prompt_format == "plain":
                llama.chat_handler = Jinja2ChatFormatter(
                    template=PLAIN_TEMPLATE,
                    bos_token=_token_text(llama, llama.token_bos()),
                    eos_token=_token_text(llama, llama.token_eos()),
                ).to_chat_handler()
            self.chat_model = LlamaCppChatModel(llama=llama, **self.sampling)
        self._llama = llama

    @property
    def llama(self) -> Any:
        if self._llama is None:
            raise ModelError("llama.cpp model is not loaded")
        return self._llama

    def count_tokens(self, text: str) -> int:
        # Tokenizing reads only the vocabulary, not the decoding context the lock guards.
        return len(self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def _generate(
        self,
        messages: Sequence[BaseMessage],
        cancel: threading.Event,
        on_token: TokenSink,
        conversation_id: str | None,
    ) -> Generation:
        assert self.chat_model is not None
        relay = _Relay(on_token)
        if self.prompt_format == "llama-2":
            # Meta's reference strips every message (llama/generation.py); Llama2Chat does not.
            stripped = [m.model_copy(update={"content": str(m.content).strip()}) for m in messages]
            self.chat_model.invoke(stripped, {"callbacks": [relay]}, cancel=cancel)
        else:
            for chunk in self.chat_model.stream(list(messages)):
                if cancel.is_set():
                    break  # closing the stream stops llama.cpp mid-reply
                relay.piece(str(chunk.content), chunk.response_metadata.get("finish_reason"))
        elapsed = time.perf_counter() - relay.started
        if cancel.is_set():
            raise ModelError("generation cancelled")
        text = "".join(relay.pieces).strip()
        return Generation(
            text=text,
            completion_tokens=self.count_tokens(text),
            seconds=elapsed,
            first_token_seconds=relay.first_token_seconds,
            finish_reason=relay.finish_reason,
        )


def _token_text(llama: Any, token: int) -> str:
    return llama.detokenize([token], special=True).decode("utf-8", errors="ignore")
