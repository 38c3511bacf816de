"""llama.cpp through LangChain, several conversations at once.

The model runs in one :class:`~marvin_faust.llm.engine.BatchedEngine`: one decode thread that
answers up to ``MARVIN_PARALLEL`` conversations in the same batches and keeps each
conversation's KV cache for its next turn. LangChain sits on top of it as two small models:

- :class:`LlamaCppLLM`, a text-completion ``LLM``: prompt text in, streamed reply out;
- :class:`TemplateChatModel`, a ``BaseChatModel`` that renders messages with a Jinja chat
  template (llama-cpp-python's ``Jinja2ChatFormatter``) and completes the text with the LLM.

Why our own LangChain models instead of langchain-community's ``ChatLlamaCpp`` and ``LlamaCpp``:
langchain-community is being sunset (importing it warns that it is unmaintained), its wrappers
are frozen, and they drive llama-cpp-python's high-level ``Llama``, which decodes one sequence.

Prompt format (``MARVIN_PROMPT_FORMAT``):

- ``template``: the chat template in the GGUF's metadata;
- ``llama-2``: Meta's Llama-2 chat format, for Llama-2 chat models (they ship no template).
  langchain-experimental's ``Llama2Chat`` renders it over :class:`LlamaCppLLM`, as in the
  system this project replaces: llama-cpp-python's own ``llama-2`` chat format is not Meta's
  (no blank line after ``<</SYS>>``, no space after ``[/INST]``);
- ``plain``: an explicit ``Human:`` / ``Marvin:`` transcript, for base models such as the
  offline Gemma 3 270M; a base model given the Llama-2 format writes ``[INST]`` into its replies;
- ``auto`` picks the first that fits, in that order.

Every format ends up as text for :class:`LlamaCppLLM`, tokenized with special tokens parsed
(``<s>`` is a Llama-2 model's BOS) and BOS added only when the text does not start with it.
Stop sequences end a reply where its turn ends.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    BaseCallbackHandler,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.llms import LLM
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk
from pydantic import ConfigDict

from .base import (
    ChatBackend,
    Generation,
    ModelError,
    ModelLoadError,
    TokenSink,
    text_of_last_tokens,
)
from .engine import BatchedEngine, Completion, EngineCancelled, EngineError, Sampling

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


# What the last chunk of a reply carries in its generation_info, from the engine's Completion.
_COMPLETION_INFO = ("finish_reason", "completion_tokens", "prompt_tokens", "reused_tokens")


class LlamaCppLLM(LLM):
    """A LangChain text-completion model over a :class:`BatchedEngine`, streaming.

    Keyword arguments of a call: ``session`` (the conversation, whose KV cache the engine
    reuses) and ``cancel`` (a ``threading.Event`` that stops the reply, prompt evaluation
    included). The last chunk's ``generation_info`` says why the reply ended and how many
    tokens it took.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: Any  # BatchedEngine, or anything with its tokenize/token_bos/submit
    max_tokens: int = 250
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 150
    repeat_penalty: float = 1.2
    seed: int = -1
    stop: list[str] = STOP_SEQUENCES

    @property
    def _llm_type(self) -> str:
        return "llama-cpp-batched"

    def prompt_tokens(self, prompt: str) -> list[int]:
        tokens = self.engine.tokenize(prompt, add_bos=False, special=True)
        bos = self.engine.token_bos()
        if bos >= 0 and tokens[:1] != [bos]:
            tokens.insert(0, bos)
        return tokens

    def _submit(
        self, prompt: str, stop: list[str] | None, on_piece: Callable[[str], None], **kwargs: Any
    ) -> tuple[Future[Completion], threading.Event]:
        cancel: threading.Event = kwargs.get("cancel") or threading.Event()
        sampling = Sampling(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repeat_penalty=self.repeat_penalty,
            seed=self.seed,
            stop=(*self.stop, *(stop or [])),
        )
        future = self.engine.submit(
            self.prompt_tokens(prompt),
            sampling,
            session=kwargs.get("session"),
            on_piece=on_piece,
            cancel=cancel,
        )
        return future, cancel

    @staticmethod
    def _last_chunk(completion: Completion) -> GenerationChunk:
        return GenerationChunk(
            text="", generation_info={key: getattr(completion, key) for key in _COMPLETION_INFO}
        )

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        pieces: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        future, cancel = self._submit(prompt, stop, pieces.put, **kwargs)
        # The engine calls on_piece before it settles the future: None comes after every piece.
        future.add_done_callback(lambda _: pieces.put(None))
        try:
            while (piece := pieces.get()) is not None:
                chunk = GenerationChunk(text=piece)
                if run_manager:
                    run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
            last = self._last_chunk(future.result())
        finally:
            cancel.set()  # a reader that stops early stops llama.cpp too
        if run_manager:
            run_manager.on_llm_new_token("", chunk=last)
        yield last

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        def from_engine(piece: str | None) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        future, cancel = self._submit(prompt, stop, from_engine, **kwargs)
        future.add_done_callback(lambda _: from_engine(None))
        try:
            while (piece := await pieces.get()) is not None:
                chunk = GenerationChunk(text=piece)
                if run_manager:
                    await run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
            last = self._last_chunk(future.result())
        finally:
            cancel.set()  # a timed-out or abandoned reply stops llama.cpp too
        if run_manager:
            await run_manager.on_llm_new_token("", chunk=last)
        yield last

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return "".join(chunk.text for chunk in self._stream(prompt, stop, run_manager, **kwargs))

    async def _acall(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        chunks = [chunk async for chunk in self._astream(prompt, stop, run_manager, **kwargs)]
        return "".join(chunk.text for chunk in chunks)


class TemplateChatModel(BaseChatModel):
    """A LangChain chat model: messages rendered by a Jinja chat template, then completed by
    :class:`LlamaCppLLM` (which takes the same ``session`` and ``cancel`` arguments)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    llm: LlamaCppLLM
    formatter: Any  # llama_cpp.llama_chat_format.Jinja2ChatFormatter

    @property
    def _llm_type(self) -> str:
        return "llama-cpp-batched-chat"

    def render(self, messages: Sequence[BaseMessage]) -> str:
        return self.formatter(messages=to_openai_messages(messages)).prompt

    @staticmethod
    def _chat_chunk(chunk: GenerationChunk) -> ChatGenerationChunk:
        return ChatGenerationChunk(
            message=AIMessageChunk(content=chunk.text), generation_info=chunk.generation_info
        )

    @staticmethod
    def _result(chunks: list[GenerationChunk]) -> ChatResult:
        info = chunks[-1].generation_info or {}
        message = AIMessage(
            content="".join(chunk.text for chunk in chunks).strip(),
            usage_metadata={
                "input_tokens": info["prompt_tokens"],
                "output_tokens": info["completion_tokens"],
                "total_tokens": info["prompt_tokens"] + info["completion_tokens"],
            },
        )
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # BaseChatModel.stream() reports each chunk to the callbacks itself.
        for chunk in self.llm._stream(self.render(messages), stop, None, **kwargs):
            yield self._chat_chunk(chunk)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in self.llm._astream(self.render(messages), stop, None, **kwargs):
            yield self._chat_chunk(chunk)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        prompt = self.render(messages)
        return self._result(list(self.llm._stream(prompt, stop, run_manager, **kwargs)))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        prompt = self.render(messages)
        return self._result(
            [chunk async for chunk in self.llm._astream(prompt, stop, run_manager, **kwargs)]
        )


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
    """One reply's pieces as llama.cpp writes them, received as LangChain callbacks: passes
    each to the backend's token sink and keeps what the last chunk says of the reply."""

    run_inline = True  # on the event loop, in order: not in an executor

    def __init__(self, on_token: TokenSink) -> None:
        self.on_token = on_token
        self.started = time.perf_counter()
        self.first_token_seconds: float | None = None
        self.info: dict[str, Any] = {}
        self.pieces: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        chunk = kwargs.get("chunk")
        self.info.update(getattr(chunk, "generation_info", None) or {})
        if not token:
            return
        if self.first_token_seconds is None:
            self.first_token_seconds = time.perf_counter() - self.started
        self.pieces.append(token)
        self.on_token(token)


class LlamaCppBackend(ChatBackend):
    """llama.cpp in a :class:`BatchedEngine`: up to ``parallel`` replies at once, each
    conversation's next turn reusing the KV cache of its last."""

    name = "llamacpp"

    def __init__(
        self,
        locate_model: Callable[[], Path],
        *,
        parallel: int = 1,
        prompt_format: str = "auto",
        n_ctx: int = 2048,
        n_gpu_layers: int = -1,
        n_threads: int | None = None,
        seed: int = -1,
        sampling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(parallel)
        self.locate_model = locate_model
        self.model_file: Path | None = None
        self.requested_format = prompt_format
        self.prompt_format: str | None = None
        self.engine_options: dict[str, Any] = {
            "n_ctx": n_ctx,
            "n_parallel": parallel,
            "n_gpu_layers": n_gpu_layers,
            "n_threads": n_threads,
        }
        self.sampling = {"seed": seed, **(sampling or {})}
        self._engine: BatchedEngine | None = None
        # TemplateChatModel, or for llama-2 Llama2Chat, over a LlamaCppLLM
        self.chat_model: BaseChatModel | None = None

    def _load(self) -> None:
        try:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as exc:
            raise ModelLoadError(f"llama-cpp-python is not importable: {exc}") from exc
        self.model_file = self.locate_model()
        try:
            engine = BatchedEngine(str(self.model_file), **self.engine_options)
        except EngineError as exc:
            raise ModelLoadError(f"could not load model {self.model_file}: {exc}") from exc
        template = engine.metadata.get("tokenizer.chat_template")
        self.prompt_format = choose_prompt_format(
            self.requested_format, template is not None, self.model_file.name
        )
        llm = LlamaCppLLM(engine=engine, **self.sampling)
        if self.prompt_format == "llama-2":
            self.chat_model = llama2_chat(llm)
        else:
            formatter = Jinja2ChatFormatter(
                template=PLAIN_TEMPLATE if self.prompt_format == "plain" else str(template),
                bos_token=engine.token_text(engine.token_bos()),
                eos_token=engine.token_text(engine.token_eos()),
            )
            self.chat_model = TemplateChatModel(llm=llm, formatter=formatter)
        engine.start()
        self._engine = engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()

    def forget(self, conversation_id: str) -> None:
        if self._engine is not None:
            self._engine.forget_session(conversation_id)

    @property
    def engine(self) -> BatchedEngine:
        if self._engine is None:
            raise ModelError("llama.cpp model is not loaded")
        return self._engine

    def count_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)

    def last_tokens(self, text: str, count: int) -> str:
        engine = self.engine
        tokens = engine.tokenize(text, add_bos=False, special=False)
        return text_of_last_tokens(tokens, count, engine.token_bytes)

    async def _run(
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
            messages = [m.model_copy(update={"content": str(m.content).strip()}) for m in messages]
        try:
            await self.chat_model.ainvoke(
                list(messages), {"callbacks": [relay]}, cancel=cancel, session=conversation_id
            )
        except EngineCancelled:
            raise ModelError("generation cancelled") from None
        except EngineError as exc:
            raise ModelError(str(exc)) from exc
        return Generation(
            text="".join(relay.pieces).strip(),
            completion_tokens=relay.info["completion_tokens"],
            seconds=time.perf_counter() - relay.started,
            first_token_seconds=relay.first_token_seconds,
            finish_reason=relay.info["finish_reason"],
            prompt_tokens=relay.info["prompt_tokens"],
            reused_tokens=relay.info["reused_tokens"],
        )
