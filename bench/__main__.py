"""``python -m bench`` (``make bench``): every figure, each next to its baseline from this run.

Starts a Kafka broker of its own on free loopback ports, worker processes and baseline loops
on it, runs the sections in order (latency, throughput, profile, recovery, model, streaming,
memory, batching), prints the results as markdown and writes them to ``bench/results/`` as
markdown and JSON. The batching section runs in this process and needs no broker: a run of it
alone starts none.
``--quick`` scales every count down for a run of a few minutes; every count is a parameter.
Slowness never fails the run: only a section that could not measure (an error) does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from marvin_faust.llm.sources import assemble_offline_model
from marvin_faust.settings import load_settings

from . import batched_bench, batching, harness, measure, model, profile, recovery, report, streaming
from .driver import FAMILIES
from .harness import RESULTS_DIR, Cluster

SECTIONS = ("latency", "throughput", "profile", "recovery", "model", "streaming", "batching")

FULL = {
    "latency_messages": 1000,
    "latency_conversations": 100,
    "throughput_messages": 3000,
    "throughput_conversations": "1,100,10000",
    "model_runs": 5,
    "streaming_runs": 80,
    "recovery_sizes": "1000,10000",
    "retention_conversations": 10000,
    "profile_seconds": 20.0,
    "batching_rounds": 3,
    "batching_max_tokens": 128,
    "reuse_rounds": 8,
}
QUICK = {
    "latency_messages": 200,
    "latency_conversations": 100,
    "throughput_messages": 1000,
    "throughput_conversations": "1,100,1000",
    "model_runs": 2,
    "streaming_runs": 12,
    "recovery_sizes": "200,1000",
    "retention_conversations": 1000,
    "profile_seconds": 8.0,
    "batching_rounds": 1,
    "batching_max_tokens": 48,
    "reuse_rounds": 3,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (a few minutes)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections to run")
    parser.add_argument("--partitions", type=int, default=4, help="MARVIN_PARTITIONS")
    parser.add_argument("--standin-latency", type=float, default=0.05, help="seconds (latency)")
    parser.add_argument("--latency-messages", type=int)
    parser.add_argument("--latency-conversations", type=int)
    parser.add_argument("--latency-concurrency", type=int, default=1, help="in flight at once")
    parser.add_argument(
        "--throughput-messages", type=int, help="per case (at least one per conversation)"
    )
    parser.add_argument("--throughput-conversations", help="comma-separated conversation counts")
    parser.add_argument(
        "--throughput-guarantees",
        help="processing guarantees to run the worker's throughput with (default: its own)",
    )
    parser.add_argument(
        "--producers",
        default=",".join(FAMILIES),
        help="client families the latency and throughput drivers produce with",
    )
    parser.add_argument("--profile-seconds", type=float)
    parser.add_argument("--recovery-sizes", help="comma-separated conversation counts")
    parser.add_argument("--recovery-turns", type=int, default=10, help="turns per conversation")
    parser.add_argument(
        "--retention-conversations",
        type=int,
        help="recovery with 90%% of this many expired, before and after compaction (0: skip)",
    )
    parser.add_argument("--model-runs", type=int, help="measured generations per side")
    parser.add_argument(
        "--model-max-tokens", type=int, default=64, help="MARVIN_MAX_TOKENS (model, streaming)"
    )
    parser.add_argument(
        "--streaming-runs", type=int, help="measured rounds, each asking streaming on and off"
    )
    parser.add_argument(
        "--stream-interval",
        type=float,
        help="MARVIN_STREAM_INTERVAL of the streaming worker (default: the worker's)",
    )
    parser.add_argument(
        "--batching-counts", default="1,2,4,8", help="conversations at once (batching)"
    )
    parser.add_argument("--batching-rounds", type=int, help="rounds per count (batching)")
    parser.add_argument(
        "--batching-max-tokens", type=int, help="tokens generated per reply (batching)"
    )
    parser.add_argument("--batching-n-ctx", type=int, default=2048, help="engine context")
    parser.add_argument(
        "--batching-threads",
        type=int,
        help="llama.cpp threads for every side (default: the engine's, generation on half the "
        "cores, prompts on all)",
    )
    parser.add_argument("--reuse-rounds", type=int, help="conversations of 5 turns (batching)")
    parser.add_argument(
        "--no-batched-bench",
        action="store_true",
        help="skip the llama-batched-bench baseline (it is built on first use)",
    )
    parser.add_argument("--seed", type=int, default=42, help="MARVIN_SEED")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, data)")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    args.throughput_conversations = _ints(args.throughput_conversations)
    args.throughput_guarantees = [
        g.strip()
        for g in (args.throughput_guarantees or load_settings().processing_guarantee).split(",")
        if g.strip()
    ]
    args.recovery_sizes = _ints(args.recovery_sizes)
    args.batching_counts = _ints(args.batching_counts)
    args.producers = [f.strip() for f in args.producers.split(",") if f.strip()]
    if unknown_families := set(args.producers) - set(FAMILIES):
        parser.error(f"unknown producers {sorted(unknown_families)}; choose from {FAMILIES}")
    return args


def _ints(text: str) -> list[int]:
    return [int(part) for part in str(text).split(",") if part.strip()]


def worker_defaults() -> dict[str, Any]:
    """The worker settings every run used unless a section says otherwise (env + defaults)."""
    settings = load_settings()
    return {
        name: getattr(settings, name)
        for name in (
            "processing_guarantee",
            "commit_interval",
            "max_poll_records",
            "history_token_budget",
            "max_stored_turns",
        )
        if hasattr(settings, name)
    }


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- Sections --------------------------------------------------------------------------------


def run_latency(cluster: Cluster, args: argparse.Namespace, out: dict[str, Any]) -> None:
    def measure_on(topic: str, family: str) -> dict[str, Any]:
        return asyncio.run(
            measure.latency(
                cluster.bootstrap,
                topic,
                messages=args.latency_messages,
                conversations=args.latency_conversations,
                concurrency=args.latency_concurrency,
                model_seconds=args.standin_latency,
                isolation_level="read_committed",
                family=family,
            )
        ).as_dict()

    rows = out.setdefault("rows", [])
    for guarantee in ("at_least_once", "exactly_once"):
        for family in args.producers:
            say(f"latency: bare loop, {guarantee}, {family} producer")
            loop = cluster.bare_loop("latency", args.standin_latency, guarantee)
            rows.append(
                {
                    "path": "bare aiokafka loop",
                    "guarantee": guarantee,
                    "producer": family,
                    **measure_on(loop.topic, family),
                }
            )
            loop.stop()

            say(f"latency: worker, {guarantee}, {family} producer")
            env = cluster.app_env("latency")
            env.update(
                MARVIN_STANDIN_LATENCY=str(args.standin_latency),
                MARVIN_PROCESSING_GUARANTEE=guarantee,
            )
            worker = cluster.worker(env, f"latency-{guarantee}-{family}")
            rows.append(
                {
                    "path": "worker",
                    "guarantee": guarantee,
                    "producer": family,
                    **measure_on(env["MARVIN_TOPIC"], family),
                }
            )
            assert worker.process is not None
            out.setdefault("standin_worker_peak_rss_kib", {})[guarantee] = harness.proc_status_kib(
                worker.process.pid, "VmHWM"
            )
            worker.stop()


def run_throughput(cluster: Cluster, args: argparse.Namespace, out: dict[str, Any]) -> None:
    def cases_on(topic: str, pid: int, family: str = "aiokafka") -> list[dict[str, Any]]:
        results = []
        for conversations in args.throughput_conversations:
            messages = max(args.throughput_messages, conversations)
            cpu_before = harness.cpu_seconds(pid)
            result = asyncio.run(
                measure.throughput(
                    cluster.bootstrap,
                    topic,
                    messages=messages,
                    conversations=conversations,
                    family=family,
                )
            )
            # CPU of the answering process over the whole call (warm-up included): near 100%
            # means it is bound by its own Python, not by waiting on Kafka.
            cpu = (harness.cpu_seconds(pid) - cpu_before) / (result.seconds or 1)
            say(f"  {conversations} conversations: {result.per_second:.1f} messages/s")
            results.append({**result.as_dict(), "cpu_percent_of_a_core": round(100 * cpu)})
        return results

    rows = out.setdefault("rows", [])
    for guarantee in ("at_least_once", "exactly_once"):
        for family in args.producers:
            say(f"throughput: bare loop, {guarantee}, {family} producer")
            loop = cluster.bare_loop("throughput", 0.0, guarantee)
            assert loop.process is not None
            cases = cases_on(loop.topic, loop.process.pid, family)
            rows.append(
                {
                    "path": "bare aiokafka loop",
                    "guarantee": guarantee,
                    "producer": family,
                    "cases": cases,
                }
            )
            loop.stop()

    def measure_row(path: str, guarantee: str, family: str, env_name: str, start: Any) -> Any:
        """Start a process with ``start(env)``, run the cases on it and add its row."""
        say(f"throughput: {path}, {guarantee}, {family} producer")
        env = cluster.app_env(env_name)
        env["MARVIN_PROCESSING_GUARANTEE"] = guarantee
        started = start(env)
        assert started.process is not None
        cases = cases_on(env["MARVIN_TOPIC"], started.process.pid, family)
        rows.append({"path": path, "guarantee": guarantee, "producer": family, "cases": cases})
        return started

    for guarantee in args.throughput_guarantees:
        # Faust alone stalls under exactly_once on keys placed by CRC32 (faust_fixes.py, fix 7):
        # its baseline is measured with murmur2 keys only.
        measure_row(
            "minimal Faust agent",
            guarantee,
            "aiokafka",
            "faust-loop",
            lambda env: cluster.faust_loop(env, "throughput-faust-loop"),
        ).stop()
        for family in args.producers:
            worker = measure_row(
                "worker",
                guarantee,
                family,
                "throughput",
                lambda env, family=family: cluster.worker(env, f"throughput-{family}"),
            )
            out.setdefault("worker_peak_rss_kib", {})[guarantee] = harness.proc_status_kib(
                worker.process.pid, "VmHWM"
            )
            worker.stop()


def run_profile(cluster: Cluster, args: argparse.Namespace, out: dict[str, Any]) -> None:
    conversations = 100
    say(f"profile: py-spy on a worker, {conversations} conversations, {args.profile_seconds:g}s")
    env = cluster.app_env("profile")
    worker = cluster.worker(env, "profile")
    assert worker.process is not None
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / f"bench-{args.stamp}-profile.txt"

    async def load_while_sampling() -> measure.ThroughputResult:
        # Enough messages to keep the worker busy past the recording (about 150/s here).
        messages = max(args.throughput_messages, int(args.profile_seconds * 400))
        task = asyncio.create_task(
            measure.throughput(
                cluster.bootstrap,
                env["MARVIN_TOPIC"],
                messages=messages,
                conversations=conversations,
            )
        )
        await asyncio.sleep(2.0)  # past the warm-up
        recorder = profile.start_recording(worker.process.pid, raw, args.profile_seconds)
        _, errors = await asyncio.to_thread(recorder.communicate)
        if recorder.returncode != 0:
            raise RuntimeError(f"py-spy failed: {errors.strip()[-500:]}")
        return await task

    result = asyncio.run(load_while_sampling())
    worker.stop()
    summary = profile.summarize(raw)
    out.update(
        conversations=conversations,
        seconds=args.profile_seconds,
        throughput_while_sampled=result.as_dict(),
        raw_file=str(raw),
        **summary.as_dict(top=15),
    )


def run_recovery(cluster: Cluster, args: argparse.Namespace, out: dict[str, Any]) -> None:
    say(f"recovery: {args.recovery_sizes} conversations of {args.recovery_turns} turns")
    baseline, results = recovery.recovery(cluster, args.recovery_sizes, args.recovery_turns)
    out["turns_per_conversation"] = args.recovery_turns
    out["rows"] = [baseline.as_dict(), *(r.as_dict() for r in results)]
    if args.retention_conversations:
        say(f"recovery: {args.retention_conversations} conversations, 90% expired")
        rows, expiry = recovery.retention(
            cluster, args.retention_conversations, args.recovery_turns
        )
        out["rows"] += [r.as_dict() for r in rows]
        out["expiry"] = expiry


def run_model(cluster: Cluster, args: argparse.Namespace, out: dict[str, Any]) -> None:
    data_dir = cluster.workdir / "model-state"
    settings = model.model_settings(data_dir, args.seed, args.model_max_tokens)
    say(f"model: direct, in-process backend and worker, {args.model_runs} rounds")
    sides, extra = model.model_path(cluster, settings, args.model_runs)
    out.update(
        prompt=model.PROMPT_TEXT,
        rows=[
            {"path": "direct create_completion", **sides["direct"].as_dict()},
            {"path": "in-process backend.generate", **sides["backend"].as_dict()},
            {"path": "worker (its log and /metrics)", **sides["worker"].as_dict()},
            {"path": "worker, end to end over Kafka", **sides["end_to_end"].as_dict()},
        ],
        **extra,
    )


def run_streaming(cluster: Cluster, args: argparse.Namespace, out: dict[str, Any]) -> None:
    data_dir = cluster.workdir / "streaming-state"
    settings = model.model_settings(data_dir, args.seed, args.model_max_tokens)
    say(f"streaming: workers with streaming on and off, {args.streaming_runs} rounds")
    out.update(
        streaming.streaming_path(cluster, settings, args.streaming_runs, args.stream_interval)
    )


def run_batching(workdir: Path, args: argparse.Namespace, out: dict[str, Any]) -> None:
    setup = batching.Setup(
        model_file=assemble_offline_model(workdir / "models"),
        n_ctx=args.batching_n_ctx,
        n_batch=512,
        threads=args.batching_threads,
        max_tokens=args.batching_max_tokens,
        rounds=args.batching_rounds,
    )
    binary = None
    if not args.no_batched_bench:
        binary = batched_bench.ensure_binary(batched_bench.installed_version(), say)
    out["setup"] = {
        "n_ctx": setup.n_ctx,
        "n_batch": setup.n_batch,
        "generation_threads": setup.generation_threads,
        "prompt_threads": setup.prompt_threads,
        "max_tokens": setup.max_tokens,
        "rounds": setup.rounds,
        "model_file_bytes": setup.model_file.stat().st_size,
        "batched_bench_binary": str(binary) if binary else None,
    }
    out["throughput"] = batching.throughput(setup, args.batching_counts, binary, say)
    out["reuse"] = batching.reuse(setup, args.reuse_rounds, reply_tokens=48, say=say)
    out["targets"] = batching.judge_targets(out["throughput"]["rows"], out["reuse"]["ratio_p50"])
    out["memory"] = batching.memory(setup, args.batching_counts, max_tokens=32, say=say)


RUNNERS: dict[str, Callable[[Cluster, argparse.Namespace, dict[str, Any]], None]] = {
    "latency": run_latency,
    "throughput": run_throughput,
    "profile": run_profile,
    "recovery": run_recovery,
    "model": run_model,
    "streaming": run_streaming,
}
# Sections that need no broker: they get the run's work dir instead of the cluster.
LOCAL_RUNNERS: dict[str, Callable[[Path, argparse.Namespace, dict[str, Any]], None]] = {
    "batching": run_batching,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    stamp = args.stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = Path(tempfile.mkdtemp(prefix="marvin-bench-"))
    document: dict[str, Any] = {
        "started_at": stamp,
        "mode": "quick" if args.quick else "full",
        "machine": harness.machine_info(),
        "settings": {
            key: value
            for key, value in vars(args).items()
            if key not in ("out", "keep", "only", "quick", "stamp")
        },
        "worker_settings": worker_defaults(),
        "results": {},
        "errors": {},
    }
    say(f"work dir {workdir}")
    try:
        needs_broker = any(section in RUNNERS for section in args.sections)
        with (
            harness.cluster(workdir, args.partitions) if needs_broker else nullcontext()
        ) as cluster:
            document["versions"] = harness.versions(cluster.broker if cluster else None)
            if cluster:
                say(f"broker on {cluster.bootstrap}")
            for section in args.sections:
                out: dict[str, Any] = {}
                document["results"][section] = out
                try:
                    if section in LOCAL_RUNNERS:
                        LOCAL_RUNNERS[section](workdir, args, out)
                    else:
                        RUNNERS[section](cluster, args, out)
                except Exception as exc:  # one broken section must not lose the others
                    say(f"{section} failed: {exc!r}")
                    document["errors"][section] = traceback.format_exc()
                finally:
                    if cluster:
                        cluster.stop_all()
    finally:
        document["seconds"] = round(time.monotonic() - started, 1)
        document["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        markdown = report.markdown(document)
        args.out.mkdir(parents=True, exist_ok=True)
        harness.write_json(args.out / f"bench-{stamp}.json", document)
        (args.out / f"bench-{stamp}.md").write_text(markdown)
        shutil.copyfile(args.out / f"bench-{stamp}.json", args.out / "latest.json")
        shutil.copyfile(args.out / f"bench-{stamp}.md", args.out / "latest.md")
        print(markdown)
        say(f"wrote {args.out}/bench-{stamp}.md and .json in {document['seconds']:.0f}s")
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if document["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
