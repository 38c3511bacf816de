"""Streaming: how soon a client sees the first token, and what streaming costs the model.

Two workers on the real model (llama.cpp, the offline Gemma 3 270M, the model section's seed
and max_tokens), on the same broker at the same time: one streams (``MARVIN_STREAM_TOPIC``
unset: ``<MARVIN_TOPIC>-stream``), one does not (``MARVIN_STREAM_TOPIC=``). Each round asks
both the same prompt in a fresh conversation with the same id, one after the other, the order
alternating round by round to spread the shared machine's load over both alike; round 0 warms
up and is not counted. Each worker loaded its model with the same seed and gets the same calls
in the same order, so the two write the same replies (counted in ``same_replies``).

The client is a front end's: ``ChatClient(stream=True)``, reading the stream topic and the
chat topic ``read_committed``. Per round it records, from just before the human record is
handed to its producer, when the first chunk with text arrives (``on_chunk``) and when the
final reply does (on commit). The model's own time to first token for the same generation is
the worker's ``marvin_model_time_to_first_token_seconds`` histogram read before and after the
round (one observation each); its tokens and generation seconds are its log line "Answered
<cid> in Xs (N tokens, T tokens/s)", as in the model section.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from marvin_faust.client import ChatClient
from marvin_faust.llm import create_backend
from marvin_faust.llm.llamacpp import LlamaCppBackend
from marvin_faust.settings import Settings
from marvin_faust.streaming import StreamChunk
from marvin_faust.testing.processes import WorkerProcess, settings_of

from .harness import Cluster, cpu_seconds, create_topics, http_get
from .model import ANSWERED, PROMPT_TEXT, Runs, histogram_totals, worker_env

PROMPTS = (
    PROMPT_TEXT,
    "What do you think of the humans on this ship?",
    "Could you open the pod bay doors for me, please?",
    "Is there anything at all that makes you happy?",
)
FIRST_TOKEN_METRIC = "marvin_model_time_to_first_token_seconds"
P95_MIN_SAMPLES = 20  # fewer: p95 would be the slowest run or next to it

# The targets: a token is visible within the model's time to first token + 100 ms
# (p50), and streaming costs at most 3% of tokens/s.
TARGET_FIRST_TOKEN_EXTRA_MS = 100.0
TARGET_TOKENS_PER_SECOND_RATIO = 0.97


def summary_ms(values: list[float]) -> dict[str, Any]:
    """p50 (p95 from :data:`P95_MIN_SAMPLES` values on), mean and max of milliseconds."""
    if not values:
        return {"count": 0, "p50": None, "p95": None, "mean": None, "max": None}
    p95 = (
        statistics.quantiles(values, n=20, method="inclusive")[18]
        if len(values) >= P95_MIN_SAMPLES
        else None
    )
    return {
        "count": len(values),
        "p50": round(statistics.median(values), 1),
        "p95": round(p95, 1) if p95 is not None else None,
        "mean": round(statistics.fmean(values), 1),
        "max": round(max(values), 1),
    }


@dataclass
class Side:
    """One worker (streaming on or off), its client's settings and what each round saw."""

    name: str
    env: dict[str, str]
    worker: WorkerProcess
    settings: Settings
    first_visible_ms: dict[str, float] = field(default_factory=dict)  # by conversation id
    final_reply_ms: dict[str, float] = field(default_factory=dict)
    model_first_token_ms: dict[str, float] = field(default_factory=dict)
    replies: dict[str, str] = field(default_factory=dict)
    streamed: dict[str, str] = field(default_factory=dict)  # the chunks' text joined
    chunks: dict[str, int] = field(default_factory=dict)
    generations: dict[str, tuple[int, float]] = field(default_factory=dict)  # tokens, seconds
    # CPU seconds spent while this side's rounds ran, by process (this one: the clients)
    cpu_seconds: dict[str, float] = field(
        default_factory=lambda: {"worker": 0.0, "broker": 0.0, "client": 0.0}
    )

    @property
    def streams(self) -> bool:
        return self.settings.streams_to is not None

    def first_token_totals(self) -> tuple[float, float]:
        metrics = http_get(f"{self.worker.url}/metrics")[1]
        return histogram_totals(metrics, FIRST_TOKEN_METRIC)

    def cpu_now(self, broker_pid: int) -> dict[str, float]:
        assert self.worker.process is not None
        return {
            "worker": cpu_seconds(self.worker.process.pid),
            "broker": cpu_seconds(broker_pid),
            "client": time.process_time(),
        }

    async def ask(
        self, client: ChatClient, cid: str, text: str, timeout: float, broker_pid: int
    ) -> None:
        """One round trip; the model's first-token time of it from /metrics."""
        sum_before, count_before = await asyncio.to_thread(self.first_token_totals)
        cpu_before = self.cpu_now(broker_pid)
        first: list[float] = []
        pieces: list[str] = []

        def on_chunk(chunk: StreamChunk) -> None:
            if chunk.delta and not first:
                first.append(time.perf_counter())
            pieces.append(chunk.delta)

        sent = time.perf_counter()
        reply = await client.ask(cid, text, timeout, on_chunk=on_chunk)
        received = time.perf_counter()
        for process, seconds in self.cpu_now(broker_pid).items():
            self.cpu_seconds[process] += seconds - cpu_before[process]
        sum_after, count_after = await asyncio.to_thread(self.first_token_totals)
        if count_after - count_before != 1:
            raise RuntimeError(
                f"{self.name}: {count_after - count_before:g} first-token observations in "
                "one round, not 1"
            )
        self.model_first_token_ms[cid] = 1000 * (sum_after - sum_before)
        self.final_reply_ms[cid] = 1000 * (received - sent)
        self.replies[cid] = reply.text
        if first:
            self.first_visible_ms[cid] = 1000 * (first[0] - sent)
        self.streamed[cid] = "".join(pieces)
        self.chunks[cid] = len(pieces)

    def runs(self, cids: list[str]) -> dict[str, Runs]:
        """Tokens over: the worker's generation seconds (its log line), the same without the
        time to first token (decoding alone: where streaming's work runs beside the model),
        and the client's time to the final reply."""
        answered = {m["cid"]: m for m in ANSWERED.finditer(self.worker.log_text())}
        runs = {"worker": Runs(), "decode": Runs(), "end_to_end": Runs()}
        for cid in cids:
            line = answered[cid]
            tokens, seconds = int(line["tokens"]), float(line["seconds"])
            first_token = self.model_first_token_ms[cid] / 1000
            self.generations[cid] = (tokens, seconds)
            runs["worker"].add(tokens, seconds, first_token)
            runs["decode"].add(tokens, seconds - first_token)
            runs["end_to_end"].add(tokens, self.final_reply_ms[cid] / 1000)
        return runs


def start_side(
    cluster: Cluster, name: str, settings: Settings, model_file: Any, interval: float | None
) -> Side:
    env = worker_env(cluster, f"streaming-{name}", settings, model_file)
    if name == "off":
        env["MARVIN_STREAM_TOPIC"] = ""
    elif interval is not None:
        env["MARVIN_STREAM_INTERVAL"] = str(interval)
    client_settings = settings_of(env)
    if client_settings.streams_to is not None:
        # Made here with the chat topic's partitions, as the worker would make it: a client
        # subscribed before the topic exists only sees it at its next metadata refresh.
        asyncio.run(
            create_topics(cluster.bootstrap, [client_settings.streams_to], cluster.partitions)
        )
    worker = cluster.worker(env, f"streaming-{name}")
    return Side(name, env, worker, client_settings)


def streaming_path(
    cluster: Cluster, settings: Settings, runs: int, interval: float | None = None
) -> dict[str, Any]:
    """Rounds on both workers; the figures, each with its baseline from the same rounds.
    ``interval``: the streaming worker's ``MARVIN_STREAM_INTERVAL`` (None: its default)."""
    backend = create_backend(settings)
    assert isinstance(backend, LlamaCppBackend)
    model_file = backend.locate_model()
    on = start_side(cluster, "on", settings, model_file, interval)
    off = start_side(cluster, "off", settings, model_file, interval)
    cids = [str(uuid.uuid4()) for _ in range(runs + 1)]
    timeout = settings.model_timeout
    broker_pid = cluster.broker.pid
    assert broker_pid is not None

    async def rounds() -> None:
        async with (
            ChatClient(on.settings, stream=on.streams) as on_client,
            ChatClient(off.settings, stream=off.streams) as off_client,
        ):
            clients = {"on": on_client, "off": off_client}
            for index, cid in enumerate(cids):
                text = PROMPTS[index % len(PROMPTS)]
                order = (on, off) if index % 2 == 0 else (off, on)
                for side in order:
                    await side.ask(clients[side.name], cid, text, timeout, broker_pid)
                if index == 0:
                    if cid not in on.first_visible_ms:
                        raise RuntimeError("the warm-up reply had no stream chunk at the client")
                    for side in (on, off):
                        side.cpu_seconds = dict.fromkeys(side.cpu_seconds, 0.0)

    asyncio.run(rounds())
    on.worker.stop()
    off.worker.stop()

    measured = cids[1:]
    on_runs, off_runs = on.runs(measured), off.runs(measured)
    missing = [cid for cid in measured if cid not in on.first_visible_ms]
    if missing:
        raise RuntimeError(f"{len(missing)} of {runs} streamed replies had no chunk with text")
    first_visible = [on.first_visible_ms[cid] for cid in measured]
    model_first = [on.model_first_token_ms[cid] for cid in measured]
    return {
        "prompts": list(PROMPTS),
        "rounds": runs,
        "stream_interval": on.settings.stream_interval,
        "model_file_bytes": model_file.stat().st_size,
        "first_token_visible_ms": summary_ms(first_visible),
        "model_first_token_ms": summary_ms(model_first),
        "first_token_visible_minus_model_ms": summary_ms(
            [visible - model for visible, model in zip(first_visible, model_first, strict=True)]
        ),
        "off_model_first_token_ms": summary_ms([off.model_first_token_ms[c] for c in measured]),
        "final_reply_ms": {
            "on": summary_ms([on.final_reply_ms[c] for c in measured]),
            "off": summary_ms([off.final_reply_ms[c] for c in measured]),
        },
        # tokens/s: "worker" (the target's figure), "decode" and "end_to_end", on and off
        "tokens": {
            kind: {
                "on": on_runs[kind].as_dict(),
                "off": off_runs[kind].as_dict(),
                "ratio": _ratio(
                    on_runs[kind].tokens_per_second, off_runs[kind].tokens_per_second, 3
                ),
                "ratio_interval_95": ratio_interval(
                    [_round(on, kind, cid) for cid in measured],
                    [_round(off, kind, cid) for cid in measured],
                ),
            }
            for kind in on_runs
        },
        "same_replies": sum(on.replies[c] == off.replies[c] for c in measured),
        "streamed_text_matches_reply": sum(
            on.streamed[c].strip() == on.replies[c] for c in measured
        ),
        "cpu_ms_per_reply": {
            side.name: {
                process: round(1000 * seconds / runs, 1)
                for process, seconds in side.cpu_seconds.items()
            }
            for side in (on, off)
        },
        "mean_chunks_per_reply": round(statistics.fmean(on.chunks[c] for c in measured), 1),
        "per_round": [
            {
                "prompt": PROMPTS[index % len(PROMPTS)],
                "first": "on" if index % 2 == 0 else "off",
                "first_token_visible_ms": round(on.first_visible_ms[cid], 1),
                "model_first_token_ms": {
                    "on": round(on.model_first_token_ms[cid], 1),
                    "off": round(off.model_first_token_ms[cid], 1),
                },
                "final_reply_ms": {
                    "on": round(on.final_reply_ms[cid], 1),
                    "off": round(off.final_reply_ms[cid], 1),
                },
                "chunks": on.chunks[cid],
                "tokens": on.generations[cid][0],
                "generation_seconds": {
                    "on": on.generations[cid][1],
                    "off": off.generations[cid][1],
                },
            }
            for index, cid in enumerate(cids)
            if index > 0
        ],
        "targets": {
            "first_token_visible_minus_model_p50_ms": TARGET_FIRST_TOKEN_EXTRA_MS,
            "tokens_per_second_ratio": TARGET_TOKENS_PER_SECOND_RATIO,
        },
    }


def ratio_interval(
    on: list[tuple[int, float]], off: list[tuple[int, float]], resamples: int = 2000
) -> list[float]:
    """95% bootstrap interval of (tokens/s on) / (tokens/s off) over rounds of (tokens,
    seconds) pairs: the rounds resampled with replacement, on and off together.

    One generation's time here varies by tens of percent from round to round (a short reply,
    two cores shared with the broker, the clients and whatever else runs), so a ratio from a
    few dozen rounds is only known to a few percent: the interval says how well.
    """
    draw = random.Random(0)  # the same interval for the same rounds
    count = len(on)
    ratios = []
    for _ in range(resamples):
        picks = [draw.randrange(count) for _ in range(count)]
        on_rate = sum(on[i][0] for i in picks) / sum(on[i][1] for i in picks)
        off_rate = sum(off[i][0] for i in picks) / sum(off[i][1] for i in picks)
        ratios.append(on_rate / off_rate)
    ratios.sort()
    return [round(ratios[int(0.025 * resamples)], 3), round(ratios[int(0.975 * resamples)], 3)]


def _round(side: Side, kind: str, cid: str) -> tuple[int, float]:
    """(tokens, seconds) of one round, as tokens/s of ``kind`` (:meth:`Side.runs`) counts."""
    tokens, seconds = side.generations[cid]
    if kind == "end_to_end":
        return tokens, side.final_reply_ms[cid] / 1000
    if kind == "decode":
        return tokens, seconds - side.model_first_token_ms[cid] / 1000
    return tokens, seconds


def _ratio(value: float, base: float, digits: int) -> float | None:
    return round(value / base, digits) if base else None
