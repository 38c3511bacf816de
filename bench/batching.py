"""Several conversations at once: the continuous-batching engine against one sequence at a time.

All in the bench process (no broker), on the offline Gemma 3 270M GGUF, with
``marvin_faust.llm.engine.BatchedEngine`` driven directly. Three parts:

- **throughput**: for each count (1, 2, 4, 8) an engine with ``n_parallel`` = the count is
  handed that many conversations at the same moment, each its own prompt. Aggregate tokens/s =
  tokens generated / seconds from the first submit to the last reply; a reply's latency runs
  from its submit to its end (p50/p95 over all replies of all rounds). Baselines:

  (a) the single-sequence path in the same rounds: llama-cpp-python's high-level
      ``Llama.create_completion`` on the same prompts with the same sampling and max tokens, one
      after the other. The conversations arrived together, so a reply's latency includes the
      replies answered before it;
  (b) llama.cpp's own ``llama-batched-bench`` (:mod:`bench.batched_bench`), built from the
      llama.cpp that llama-cpp-python vendors: the same GGUF, context, batch size, unified KV
      cache, prompt and generation lengths (``-npp``, ``-ntg``, ``-npl`` = the count), once in
      each round. Threads: the engine generates on ``n_threads`` (half the cores by default) and
      evaluates prompts on all cores; llama.cpp runs any batch of more than one token on
      ``-tb`` threads, so llama-batched-bench gets ``-t`` = ``-tb`` = the engine's generation
      threads (its prompts, a small part of its time, then run on fewer threads than the
      engine's). With ``-tb`` at all cores here, its batched generation steps, whose threads
      spin at every graph node's barrier, slowed down five- to tenfold whenever other processes
      took a core. Its generated tokens over its whole time (``B * TG / T``,
      prompts included) is the figure the engine's aggregate is read against; ``S_TG`` (decode
      alone) is reported beside it.

  Sampling is greedy (temperature 0, the project's repeat penalty), and each prompt asks for a
  long story in chapters, so replies run to max tokens (the tokens actually generated are what
  is counted). Every prompt of a run starts with a different word: no prompt reuses another's
  cached prefix past the BOS token, in the engine or in ``Llama``. Each round runs the three
  sides one after the other, a different one first each round, to spread the shared machine's
  load over all three.

- **reuse**: time to first token of a conversation's 5th turn, with KV reuse (the same session
  id every turn: the engine keeps the conversation's slot and evaluates only the new tokens)
  and without (the same prompt with ``session=None`` after another prompt has taken the slot: the
  whole prompt evaluated). One slot, so nothing else holds the conversation.

- **memory**: for each count a child process makes an engine with that ``n_parallel`` and the
  same ``n_ctx`` (each sequence's context), runs that many conversations at once and reports
  its RSS and peak RSS, and llama.cpp's KV, output and compute buffer sizes from its log; MiB
  per slot = (peak RSS at n - peak RSS at 1) / (n - 1). Twice: with the engine's default KV
  cache, ``n_ctx * n_parallel`` cells shared by the sequences (as the worker runs it), and with
  one cache of ``n_ctx`` cells for all (``kv_size=n_ctx``), which leaves what a slot costs
  beside its cells.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marvin_faust.llm.engine import BatchedEngine, Completion, Sampling
from marvin_faust.llm.llamacpp import STOP_SEQUENCES
from marvin_faust.settings import PERSONA

from . import batched_bench
from .harness import REPO, proc_status_kib

COUNTS = (1, 2, 4, 8)
# Distinct first tokens (checked on the Gemma tokenizer): no prompt shares a prefix with another.
# fmt: off
SUBJECTS = (
    "Owls", "Cats", "Ships", "Robots", "Dragons", "Rivers", "Kings", "Stars", "Trains", "Wolves",
    "Clocks", "Gardens", "Pirates", "Bees", "Castles", "Mountains", "Whales", "Lanterns", "Foxes",
    "Bridges", "Knights", "Comets", "Islands", "Horses", "Wizards", "Forests", "Lighthouses",
    "Sailors", "Giants", "Rabbits", "Tigers", "Farmers", "Violins", "Deserts", "Engines", "Ravens",
    "Moons", "Painters", "Queens", "Monks", "Storms", "Spiders", "Dolphins", "Mirrors", "Soldiers",
    "Elephants", "Pilots", "Glaciers", "Parrots", "Poets", "Tortoises", "Volcanoes", "Hunters",
    "Thieves", "Penguins", "Merchants", "Badgers", "Tailors", "Harbors", "Doctors", "Zebras",
)
# fmt: on
STORY = "{subject} are the subject of this long story, told in many chapters.\n\nChapter one\n\n"
TURNS = (
    "Hello Marvin, tell me about {subject}.",
    "Why does that make you so gloomy?",
    "What would make your day a little better?",
    "Do the other robots on the ship feel the same way?",
    "If you could leave the ship, where would you go?",
)
REPEAT_PENALTY = 1.2  # the project's default (Settings.repeat_penalty)

# The targets.
TARGET_SPEEDUP_AT_4 = 2.0  # aggregate tokens/s at 4 conversations / the single sequence's
TARGET_OF_BATCHED_BENCH = 0.9  # the engine's aggregate / llama-batched-bench's, at every count
TARGET_REUSE_FIRST_TOKEN = 0.3  # 5th turn's first token with reuse / without

_BUFFER = re.compile(r"CPU\s+(KV|output|compute) buffer size =\s+([\d.]+) MiB")


# --- pure figures ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), interpolating between the two nearest ranks (as numpy's
    default); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio(value: float | None, base: float | None, digits: int = 3) -> float | None:
    return round(value / base, digits) if value is not None and base else None


def queued_latencies(durations: Sequence[float]) -> list[float]:
    """Latency of each of several requests that arrived together and were served one after the
    other, each taking its duration: the running sum."""
    latencies, total = [], 0.0
    for duration in durations:
        total += duration
        latencies.append(total)
    return latencies


def pooled_rates(runs: Sequence[Sequence[batched_bench.BenchRow]]) -> dict[int, dict[str, float]]:
    """llama-batched-bench's rates by sequence count over several runs: all tokens / all time."""
    totals: dict[int, list[float]] = {}
    for rows in runs:
        for row in rows:
            generated, seconds, decode = totals.setdefault(row.sequences, [0.0, 0.0, 0.0])
            totals[row.sequences] = [
                generated + row.sequences * row.generated_tokens,
                seconds + row.seconds,
                decode + row.generation_seconds,
            ]
    return {
        count: {
            "generated_per_second": round(generated / seconds, 2),
            "decode_per_second": round(generated / decode, 2),
        }
        for count, (generated, seconds, decode) in sorted(totals.items())
    }


def per_slot_mib(peaks_kib: dict[int, int]) -> dict[int, float]:
    """(peak RSS with n slots - with 1) / (n - 1), in MiB, for every n > 1 measured."""
    if 1 not in peaks_kib:
        return {}
    return {
        count: round((peak - peaks_kib[1]) / 1024 / (count - 1), 2)
        for count, peak in sorted(peaks_kib.items())
        if count > 1
    }


def llama_buffers_mib(log: str) -> dict[str, float]:
    """llama.cpp's CPU buffer sizes from its log: KV (all caches), output and compute, MiB."""
    sizes: dict[str, float] = {}
    for kind, mib in _BUFFER.findall(log):
        sizes[kind] = round(sizes.get(kind, 0.0) + float(mib), 2)
    return sizes


def judge_targets(rows: Sequence[dict[str, Any]], reuse_ratio: float | None) -> dict[str, Any]:
    """The issue's three targets against a run's figures (rows: :func:`throughput`'s)."""
    by_count = {row["conversations"]: row for row in rows}
    targets: dict[str, Any] = {}
    if 4 in by_count:
        speedup = by_count[4]["engine_over_single"]
        headroom = ratio(
            by_count[4]["batched_bench"].get("generated_per_second"),
            by_count.get(1, {}).get("batched_bench", {}).get("generated_per_second"),
        )
        if speedup is not None and speedup >= TARGET_SPEEDUP_AT_4:
            verdict = "met"
        elif headroom is not None and headroom < TARGET_SPEEDUP_AT_4:
            verdict = f"not applicable: llama-batched-bench itself gains {headroom:.2f}x at 4"
        else:
            verdict = "missed"
        targets["speedup_at_4"] = {
            "value": speedup,
            "target": TARGET_SPEEDUP_AT_4,
            "batched_bench_headroom": headroom,
            "verdict": verdict,
        }
    shares = {
        count: row["engine_over_batched_bench"]
        for count, row in by_count.items()
        if row["engine_over_batched_bench"] is not None
    }
    if shares:
        below = [count for count, share in shares.items() if share < TARGET_OF_BATCHED_BENCH]
        targets["of_batched_bench"] = {
            "values": shares,
            "target": TARGET_OF_BATCHED_BENCH,
            "verdict": "met" if not below else "missed at " + ", ".join(map(str, below)),
        }
    if reuse_ratio is not None:
        targets["reuse_first_token"] = {
            "value": reuse_ratio,
            "target": TARGET_REUSE_FIRST_TOKEN,
            "verdict": "met" if reuse_ratio <= TARGET_REUSE_FIRST_TOKEN else "missed",
        }
    return targets


def transcript(persona: str, turns: Sequence[tuple[str, str]], question: str) -> str:
    """The plain prompt format (``PLAIN_TEMPLATE`` in ``marvin_faust.llm.llamacpp``), BOS aside."""
    lines = [f"{persona}\n\n"]
    for human, marvin in turns:
        lines.append(f"Human: {human}\nMarvin: {marvin}\n")
    lines.append(f"Human: {question}\nMarvin:")
    return "".join(lines)


# --- setup -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What every side runs with."""

    model_file: Path
    n_ctx: int
    n_batch: int
    threads: int | None  # None: the engine's default (generation on half the cores, prompts all)
    max_tokens: int
    rounds: int

    @property
    def generation_threads(self) -> int:
        return self.threads or max((os.cpu_count() or 1) // 2, 1)

    @property
    def prompt_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def engine(self, n_parallel: int) -> BatchedEngine:
        engine = BatchedEngine(
            str(self.model_file),
            n_ctx=self.n_ctx,
            n_parallel=n_parallel,
            n_gpu_layers=0,
            n_threads=self.threads,
            n_batch=self.n_batch,
        )
        engine.start()
        return engine

    def greedy(self, max_tokens: int | None = None, stop: Sequence[str] = ()) -> Sampling:
        return Sampling(
            max_tokens=max_tokens or self.max_tokens,
            temperature=0.0,
            repeat_penalty=REPEAT_PENALTY,
            stop=tuple(stop),
        )


def quiet_llama_cpp() -> None:
    """llama.cpp logs every model load at length through llama-cpp-python's logger."""
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


def subjects() -> Iterator[str]:
    """Prompt subjects, each first word used once; numbered once the list runs out."""
    for lap in range(1_000):
        for subject in SUBJECTS:
            yield subject if lap == 0 else f"{subject} {lap}"


# --- throughput ------------------------------------------------------------------------------


@dataclass
class Side:
    """One path's replies over the rounds of one count."""

    tokens: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)
    reused_tokens: int = 0
    rates: list[float] = field(default_factory=list)  # tokens/s of each round

    def add(self, tokens: int, seconds: float, latencies: Sequence[float]) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.latencies.extend(latencies)
        self.rates.append(tokens / seconds if seconds else 0.0)

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.seconds if self.seconds else None

    def as_dict(self) -> dict[str, Any]:
        p50, p95 = percentile(self.latencies, 50), percentile(self.latencies, 95)
        first = percentile(self.first_tokens, 50)
        return {
            "replies": len(self.latencies),
            "tokens": self.tokens,
            "mean_tokens_per_reply": round(self.tokens / len(self.latencies), 1)
            if self.latencies
            else None,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens / self.seconds, 2) if self.seconds else None,
            "latency_p50_ms": round(1000 * p50, 1) if p50 is not None else None,
            "latency_p95_ms": round(1000 * p95, 1) if p95 is not None else None,
            "first_token_p50_ms": round(1000 * first, 1) if first is not None else None,
            "reused_tokens": self.reused_tokens,
            "per_round_tokens_per_second": [round(rate, 2) for rate in self.rates],
        }


def engine_round(engine: BatchedEngine, prompts: list[list[int]], sampling: Sampling) -> Side:
    """All prompts submitted at once; the round's figures."""
    started = time.perf_counter()
    futures = [engine.submit(prompt, sampling) for prompt in prompts]
    replies: list[Completion] = [future.result() for future in futures]
    side = Side(first_tokens=[r.first_token_seconds for r in replies if r.first_token_seconds])
    side.add(
        sum(r.completion_tokens for r in replies),
        time.perf_counter() - started,
        [r.seconds for r in replies],
    )
    side.reused_tokens = sum(r.reused_tokens for r in replies)
    return side


def single_round(llama: Any, prompts: list[list[int]], setup: Setup) -> Side:
    """The prompts one after the other through ``Llama.create_completion``."""
    durations, tokens = [], 0
    for prompt in prompts:
        started = time.perf_counter()
        reply = llama.create_completion(
            prompt,
            max_tokens=setup.max_tokens,
            temperature=0.0,
            repeat_penalty=REPEAT_PENALTY,
        )
        durations.append(time.perf_counter() - started)
        tokens += reply["usage"]["completion_tokens"]
    side = Side()
    side.add(tokens, sum(durations), queued_latencies(durations))
    return side


def merge(total: Side, part: Side) -> None:
    total.add(part.tokens, part.seconds, part.latencies)
    total.first_tokens.extend(part.first_tokens)
    total.reused_tokens += part.reused_tokens


def load_llama(setup: Setup) -> Any:
    """The high-level API with the engine's settings: flash attention (llama.cpp's automatic
    choice on the CPU, which the engine leaves to it), full-size sliding-window cache."""
    import llama_cpp

    return llama_cpp.Llama(
        str(setup.model_file),
        n_ctx=setup.n_ctx,
        n_batch=setup.n_batch,
        n_threads=setup.generation_threads,
        n_threads_batch=setup.prompt_threads,
        n_gpu_layers=0,
        flash_attn=True,
        swa_full=True,
        verbose=False,
    )


SIDES = ("engine", "single", "batched-bench")


def rotation(names: Sequence[str], index: int) -> list[str]:
    """Round ``index``'s order: each side first in turn, to spread the machine's load."""
    shift = index % len(names)
    return [*names[shift:], *names[:shift]]


def batched_bench_command(
    setup: Setup, binary: Path, prompt_tokens: int, sequences: int, kv_size: int
) -> list[str]:
    """llama-batched-bench with the engine's settings, for ``sequences`` at once; its context
    (-c) is the engine's KV cache, which all sequences share."""
    return batched_bench.command(
        binary,
        setup.model_file,
        prompt_tokens=prompt_tokens,
        generated_tokens=setup.max_tokens,
        sequences=[sequences],
        n_ctx=kv_size,
        n_batch=setup.n_batch,
        # llama.cpp runs any batch of more than one token on -tb threads: generating several
        # sequences on the engine's generation threads takes -tb = those.
        threads=setup.generation_threads,
        threads_batch=setup.generation_threads,
        gpu_layers=0,
        swa_full=True,
    )


def throughput(
    setup: Setup, counts: Sequence[int], bench_binary: Path | None, say: Callable[[str], None]
) -> dict[str, Any]:
    llama = load_llama(setup)
    quiet_llama_cpp()
    names = subjects()

    def story(subject: str) -> list[int]:
        return llama.tokenize(STORY.format(subject=subject).encode(), add_bos=True, special=False)

    warm_up = story(next(names))
    llama.create_completion(warm_up, max_tokens=8, temperature=0.0)
    prompt_lengths: list[int] = []
    rounds_by_count: dict[int, list[list[list[int]]]] = {}
    for count in counts:
        rounds_by_count[count] = [
            [story(next(names)) for _ in range(count)] for _ in range(setup.rounds)
        ]
        prompt_lengths += [len(p) for prompts in rounds_by_count[count] for p in prompts]
    prompt_tokens = round(statistics.median(prompt_lengths))

    bench_runs: dict[int, list[list[batched_bench.BenchRow]]] = {}
    bench_settings: dict[str, str] = {}
    bench_line = ""
    sides: dict[int, dict[str, Side]] = {}
    load: dict[int, list[float]] = {}  # 1-minute load average before and after each count
    for count in counts:
        say(f"batching: {count} conversations at once, {setup.rounds} rounds")
        load[count] = [os.getloadavg()[0]]
        engine = setup.engine(count)
        sides[count] = {"engine": Side(), "single": Side()}
        bench_runs[count] = []
        try:
            engine.submit(warm_up, setup.greedy(8)).result()
            for index, prompts in enumerate(rounds_by_count[count]):
                for name in rotation(SIDES, index):
                    if name == "engine":
                        merge(sides[count][name], engine_round(engine, prompts, setup.greedy()))
                    elif name == "single":
                        merge(sides[count][name], single_round(llama, prompts, setup))
                    elif bench_binary is not None:
                        command = batched_bench_command(
                            setup, bench_binary, prompt_tokens, count, engine.kv_size
                        )
                        table, bench_settings, _ = batched_bench.run(command)
                        bench_runs[count].append(table)
                        bench_line = " ".join(command)
        finally:
            engine.close()
        load[count].append(os.getloadavg()[0])
    llama.close()

    bench = pooled_rates([rows for runs in bench_runs.values() for rows in runs])
    rows = []
    for count in counts:
        engine_side, single_side = sides[count]["engine"], sides[count]["single"]
        reference = bench.get(count, {})
        rows.append(
            {
                "conversations": count,
                "load_average": [round(value, 2) for value in load[count]],
                "engine": engine_side.as_dict(),
                "single": single_side.as_dict(),
                "batched_bench": reference,
                "engine_over_single": ratio(
                    engine_side.tokens_per_second, single_side.tokens_per_second
                ),
                "engine_over_batched_bench": ratio(
                    engine_side.tokens_per_second, reference.get("generated_per_second")
                ),
            }
        )
    return {
        "prompt": STORY.format(subject="<subject>"),
        "prompt_tokens_median": prompt_tokens,
        "rows": rows,
        "batched_bench": {
            "last_command": bench_line,
            "settings": bench_settings,
            "runs": {
                count: [row.as_dict() for table in runs for row in table]
                for count, runs in bench_runs.items()
            },
        },
    }


# --- reuse -----------------------------------------------------------------------------------


def reuse(setup: Setup, rounds: int, reply_tokens: int, say: Callable[[str], None]) -> dict:
    """The 5th turn's time to first token with the conversation's cache and without."""
    say(f"batching: 5th-turn first token with and without KV reuse, {rounds} rounds")
    quiet_llama_cpp()
    engine = setup.engine(1)
    names = subjects()
    first_ms: dict[str, list[float]] = {"with": [], "without": []}
    reused: dict[str, list[int]] = {"with": [], "without": []}
    prompt_tokens: list[int] = []
    reply = setup.greedy(reply_tokens, STOP_SEQUENCES)
    measure = setup.greedy(4)  # no stop sequences: none holds back the first piece

    def tokens(text: str) -> list[int]:
        return engine.tokenize(text, add_bos=True, special=False)

    try:
        engine.submit(tokens(STORY.format(subject="Owls")), setup.greedy(8)).result()
        for index in range(rounds):
            subject = next(names)
            session = f"reuse-{index}"
            turns: list[tuple[str, str]] = []
            questions = [TURNS[0].format(subject=subject), *TURNS[1:]]
            for question in questions[:-1]:
                prompt = tokens(transcript(PERSONA, turns, question))
                answer = engine.submit(prompt, reply, session=session).result()
                turns.append((question, answer.text.strip()))
            last = tokens(transcript(PERSONA, turns, questions[-1]))
            prompt_tokens.append(len(last))
            cases = {
                "with": engine.submit(last, measure, session=session).result(),
                # another prompt takes the only slot, then the same 5th turn without a session
                "flush": engine.submit(tokens(STORY.format(subject=subject)), measure).result(),
                "without": engine.submit(last, measure).result(),
            }
            for case in ("with", "without"):
                done = cases[case]
                first = done.first_token_seconds or done.seconds
                first_ms[case].append(1000 * first)
                reused[case].append(done.reused_tokens)
    finally:
        engine.close()
    p50 = {case: percentile(values, 50) for case, values in first_ms.items()}
    return {
        "rounds": rounds,
        "reply_tokens": reply_tokens,
        "prompt_tokens_mean": round(statistics.fmean(prompt_tokens), 1),
        "first_token_ms": {
            case: {
                "p50": round(p50[case] or 0.0, 1),
                "mean": round(statistics.fmean(values), 1),
                "max": round(max(values), 1),
            }
            for case, values in first_ms.items()
        },
        "reused_tokens_mean": {
            case: round(statistics.fmean(values), 1) for case, values in reused.items()
        },
        "ratio_p50": ratio(p50["with"], p50["without"]),
        "ratio_per_round_p50": ratio(
            percentile(
                [w / wo for w, wo in zip(first_ms["with"], first_ms["without"], strict=True)], 50
            ),
            1.0,
        ),
    }


# --- memory ----------------------------------------------------------------------------------

# The engine's default cache (n_ctx cells per slot) and one cache of n_ctx cells that every slot
# shares: the difference per slot is the KV cache's, the rest is what a slot costs beside it.
CACHES = {"n_ctx x slots": False, "n_ctx, shared": True}


def memory_probe(
    model_file: Path, n_ctx: int, n_parallel: int, max_tokens: int, shared_cache: bool
) -> dict:
    """In a child process: RSS before, with the engine loaded, and after n conversations."""
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG)  # the buffer sizes, on stderr
    pid = os.getpid()
    before = proc_status_kib(pid, "VmRSS")
    engine = BatchedEngine(
        str(model_file),
        n_ctx=n_ctx,
        n_parallel=n_parallel,
        n_gpu_layers=0,
        kv_size=n_ctx if shared_cache else None,
    )
    kv_size = engine.kv_size
    with engine:
        loaded = proc_status_kib(pid, "VmRSS")
        names = subjects()
        prompts = [
            engine.tokenize(STORY.format(subject=next(names)), add_bos=True, special=False)
            for _ in range(n_parallel)
        ]
        sampling = Sampling(max_tokens=max_tokens, temperature=0.0, repeat_penalty=REPEAT_PENALTY)
        replies = [f.result() for f in [engine.submit(p, sampling) for p in prompts]]
        after = proc_status_kib(pid, "VmRSS")
        peak = proc_status_kib(pid, "VmHWM")
        peak_running = engine.stats.peak_running
    return {
        "n_parallel": n_parallel,
        "kv_size": kv_size,
        "rss_before_kib": before,
        "rss_loaded_kib": loaded,
        "rss_after_kib": after,
        "peak_rss_kib": peak,
        "peak_running": peak_running,
        "tokens": sum(r.completion_tokens for r in replies),
    }


def memory(
    setup: Setup, counts: Sequence[int], max_tokens: int, say: Callable[[str], None]
) -> dict[str, Any]:
    rows = []
    for cache, shared in CACHES.items():
        by_count = []
        for count in counts:
            say(f"batching: memory with {count} slots, KV cache {cache} (a child process)")
            command = [sys.executable, "-m", "bench.batching", str(setup.model_file)]
            command += [str(setup.n_ctx), str(count), str(max_tokens)]
            done = subprocess.run(
                [*command, *(["--shared-cache"] if shared else [])],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if done.returncode != 0:
                raise RuntimeError(f"memory probe ({count} slots) failed: {done.stderr[-2000:]}")
            probe = json.loads(done.stdout.strip().splitlines()[-1])
            by_count.append(
                {"cache": cache, **probe, "llama_buffers_mib": llama_buffers_mib(done.stderr)}
            )
        slots = per_slot_mib({row["n_parallel"]: row["peak_rss_kib"] for row in by_count})
        for row in by_count:
            row["peak_mib_per_extra_slot"] = slots.get(row["n_parallel"])
        rows += by_count
    return {"n_ctx": setup.n_ctx, "max_tokens": max_tokens, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.batching MODEL N_CTX N_PARALLEL MAX_TOKENS [--shared-cache]``: one
    memory probe."""
    parser = argparse.ArgumentParser(prog="python -m bench.batching")
    parser.add_argument("model", type=Path)
    parser.add_argument("n_ctx", type=int)
    parser.add_argument("n_parallel", type=int)
    parser.add_argument("max_tokens", type=int)
    parser.add_argument("--shared-cache", action="store_true", help="kv_size = n_ctx")
    args = parser.parse_args(argv)
    probe = memory_probe(
        args.model, args.n_ctx, args.n_parallel, args.max_tokens, args.shared_cache
    )
    print(json.dumps(probe))


if __name__ == "__main__":
    main()
