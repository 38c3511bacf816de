"""Model-path efficiency: tokens/s through the worker against a direct llama-cpp-python call.

Each side loads the same GGUF with the same settings and seed (``create_backend(load_settings(
...))``, the backend the worker builds), then answers the same prompt, one warm-up and ``runs``
measured times, in the same order. The engine seeds each reply's sampler afresh, llama-cpp-python
once per model, so the texts may differ: tokens/s is the comparison.

- direct: ``Llama.create_completion(stream=True)``, llama-cpp-python's high-level API on a model
  of its own (same GGUF, context and seed), given the backend's prompt tokens, sampling and stop
  sequences; first token = first text delta;
- in-process backend: ``await backend.generate(prompt)`` (our LangChain models over the
  batched engine, one conversation at a time): what the worker runs, minus Kafka and Faust;
- worker: a ``faust -A marvin_faust worker`` process, asked over Kafka; its own figures come
  from its log lines "Answered <cid> in Xs (N tokens, T tokens/s)" and its ``/metrics``.

Tokens are counted the same way everywhere: the model's tokenizer on the stripped reply.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from marvin_faust.conversation import build_prompt
from marvin_faust.llm import create_backend
from marvin_faust.llm.llamacpp import STOP_SEQUENCES, LlamaCppBackend, TemplateChatModel
from marvin_faust.settings import Settings, load_settings

from .driver import Driver
from .harness import Cluster, http_get, proc_status_kib

PROMPT_TEXT = "Why are you so sad, Marvin? Tell me about your day."
ANSWERED = re.compile(
    r"Answered (?P<cid>\S+) in (?P<seconds>[\d.]+)s \((?P<tokens>\d+) tokens, "
    r"(?P<rate>[\d.]+) tokens/s\)"
)


@dataclass
class Runs:
    """Aggregate figures of several generations: tokens/s = all tokens / all seconds."""

    tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float = 0.0
    count: int = 0
    first_tokens: int = 0

    def add(self, tokens: int, seconds: float, first_token: float | None = None) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.count += 1
        if first_token is not None:
            self.first_token_seconds += first_token
            self.first_tokens += 1

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "generations": self.count,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 2),
            "mean_first_token_ms": round(1000 * self.first_token_seconds / self.first_tokens, 1)
            if self.first_tokens
            else None,
        }


def model_settings(data_dir: Path, seed: int, max_tokens: int, **extra: Any) -> Settings:
    return load_settings(
        backend="llamacpp", data_dir=data_dir, seed=seed, max_tokens=max_tokens, **extra
    )


def worker_env(cluster: Cluster, name: str, settings: Settings, model_file: Path) -> dict[str, str]:
    """A fresh app's settings for a worker on the real model: ``model_file``, with the seed
    and max_tokens of ``settings``."""
    env = cluster.app_env(name)
    env.update(
        MARVIN_BACKEND="llamacpp",
        MARVIN_MODEL_SOURCE="path",
        MARVIN_MODEL_PATH=str(model_file),
        MARVIN_SEED=str(settings.seed),
        MARVIN_MAX_TOKENS=str(settings.max_tokens),
    )
    return env


def loaded_backend(settings: Settings) -> LlamaCppBackend:
    backend = create_backend(settings)
    assert isinstance(backend, LlamaCppBackend)
    backend.load()
    return backend


def direct_llama(settings: Settings, model_file: Path) -> Any:
    """llama-cpp-python's high-level ``Llama`` as the backend's settings would configure it."""
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(model_file),
        n_ctx=settings.n_ctx,
        n_gpu_layers=settings.n_gpu_layers,
        n_threads=settings.n_threads,
        seed=settings.seed,
        verbose=False,
    )


def direct_generation(
    llama: Any, backend: LlamaCppBackend, request: dict[str, Any]
) -> tuple[int, float, float]:
    """One streamed ``create_completion``: (tokens, seconds, seconds to first token)."""
    started = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    for chunk in llama.create_completion(**request, stream=True):
        delta = chunk["choices"][0]["text"]
        if delta:
            if first is None:
                first = time.perf_counter() - started
            pieces.append(delta)
    elapsed = time.perf_counter() - started
    return backend.count_tokens("".join(pieces).strip()), elapsed, first or elapsed


def histogram_totals(metrics_text: str, name: str) -> tuple[float, float]:
    """(sum, count) of a Prometheus histogram in /metrics text."""
    total = count = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == f"{name}_sum":
                total = sample.value
            elif sample.name == f"{name}_count":
                count = sample.value
    return total, count


def histogram_mean_between(before: str, after: str, name: str) -> float | None:
    """Mean of the observations made between two /metrics readings."""
    (sum_before, count_before), (sum_after, count_after) = (
        histogram_totals(before, name),
        histogram_totals(after, name),
    )
    count = count_after - count_before
    return (sum_after - sum_before) / count if count else None


def model_path(
    cluster: Cluster, settings: Settings, runs: int
) -> tuple[dict[str, Runs], dict[str, Any]]:
    """All sides, interleaved: each round asks direct, in-process backend, then the worker.

    Each side has its own model loaded with the same seed, so each side's sampler sees the
    same sequence of calls; interleaving spreads any change in the shared machine's load
    over all sides alike. Round 0 warms up and is not counted.
    """
    own_backend = loaded_backend(settings)
    model_file = own_backend.model_file
    assert model_file is not None
    direct = direct_llama(settings, model_file)
    prompt = build_prompt(settings.persona, [], PROMPT_TEXT)
    chat_model = own_backend.chat_model
    assert isinstance(chat_model, TemplateChatModel)
    sampling = {key: value for key, value in own_backend.sampling.items() if key != "seed"}
    request = {
        "prompt": chat_model.llm.prompt_tokens(chat_model.render(prompt)),
        **sampling,
        "stop": STOP_SEQUENCES,
    }

    env = worker_env(cluster, "model", settings, model_file)
    worker = cluster.worker(env, "model")
    assert worker.process is not None
    metrics_url = f"{worker.url}/metrics"
    cids = [str(uuid.uuid4()) for _ in range(runs + 1)]  # a fresh conversation: same prompt
    sides = {name: Runs() for name in ("direct", "backend", "worker", "end_to_end")}
    round_trips: dict[str, float] = {}

    async def rounds() -> tuple[str, str]:
        before = ""
        async with Driver(cluster.bootstrap, env["MARVIN_TOPIC"], "read_committed") as driver:
            for index, cid in enumerate(cids):
                tokens, seconds, first = await asyncio.to_thread(
                    direct_generation, direct, own_backend, request
                )
                generation = await own_backend.generate(prompt, timeout=settings.model_timeout)
                reply = await driver.ask(cid, PROMPT_TEXT, timeout=settings.model_timeout)
                if index == 0:
                    before = (await asyncio.to_thread(http_get, metrics_url))[1]
                    continue
                sides["direct"].add(tokens, seconds, first)
                sides["backend"].add(
                    generation.completion_tokens,
                    generation.seconds,
                    generation.first_token_seconds,
                )
                round_trips[cid] = reply.seconds
            after = (await asyncio.to_thread(http_get, metrics_url))[1]
        return before, after

    before, after = asyncio.run(rounds())
    peak_kib = proc_status_kib(worker.process.pid, "VmHWM")
    rss_kib = proc_status_kib(worker.process.pid, "VmRSS")
    worker.stop()

    answered = {m["cid"]: m for m in ANSWERED.finditer(worker.log_text())}
    first_token = histogram_mean_between(before, after, "marvin_model_time_to_first_token_seconds")
    for cid in cids[1:]:
        line = answered[cid]
        sides["worker"].add(int(line["tokens"]), float(line["seconds"]), first_token)
        sides["end_to_end"].add(int(line["tokens"]), round_trips[cid])
    extra = {
        "model_file": str(model_file),
        "model_file_bytes": model_file.stat().st_size,
        "metrics_mean_tokens_per_second": histogram_mean_between(
            before, after, "marvin_model_tokens_per_second"
        ),
        "metrics_mean_first_token_seconds": first_token,
        "peak_rss_kib": peak_kib,
        "rss_kib": rss_kib,
    }
    return sides, extra
