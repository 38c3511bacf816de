"""The results document as markdown: one table per section, each figure next to its baseline."""

from __future__ import annotations

from typing import Any


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return [*lines, ""]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _ratio(value: float | None, base: float | None) -> str:
    if not value or not base:
        return "-"
    return f"{value / base:.2f}x"


def markdown(document: dict[str, Any]) -> str:
    machine, versions = document["machine"], document.get("versions", {})
    results = document["results"]
    lines = [
        f"# marvin-faust benchmarks ({document['mode']} run, {document['started_at']})",
        "",
        f"Machine: {machine['cores']} cores, {machine['cpu_model']}, "
        f"{machine['memory_gib']} GiB; load average {machine['load_average_at_start']} at "
        f"start, {machine.get('load_average_at_end')} at the end (the machine is shared). "
        f"Run took {document.get('seconds', 0):.0f} s.",
        "",
        "Versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()),
        "",
        "Bench settings: "
        + ", ".join(f"{key}={value}" for key, value in document["settings"].items()),
        "",
        "Worker settings (unless a row says otherwise): "
        + ", ".join(f"{key}={value}" for key, value in document["worker_settings"].items()),
        "",
    ]
    for name, render in (
        ("latency", _latency),
        ("throughput", _throughput),
        ("model", _model),
        ("recovery", _recovery),
        ("memory", _memory),
        ("profile", _profile),
    ):
        section = results.get(name) if name != "memory" else results
        if section:
            lines += render(section)
    for section, error in document.get("errors", {}).items():
        lines += [f"**{section} failed:**", "", "```", error.strip()[-2000:], "```", ""]
    return "\n".join(lines)


def _family_key(row: dict[str, Any]) -> tuple[str, str]:
    """(guarantee, producer family) of a row; rows from before the families were aiokafka."""
    return row["guarantee"], row.get("producer", "aiokafka")


def _latency(section: dict[str, Any]) -> list[str]:
    rows = section.get("rows", [])
    if not rows:
        return []
    base = {_family_key(r): r for r in rows if r["path"].startswith("bare")}
    first = rows[0]
    table = []
    for row in rows:
        b = base.get(_family_key(row), {}).get("overhead_ms", {})
        o, lat = row["overhead_ms"], row["latency_ms"]
        table.append(
            [
                row["path"],
                row["guarantee"],
                row.get("producer", "aiokafka"),
                o["p50"],
                o["p95"],
                o["p99"],
                lat["p50"],
                _ratio(o["p50"], b.get("p50")),
                _ratio(o["p99"], b.get("p99")),
            ]
        )
    return [
        "## 1. Routing overhead",
        "",
        f"Round trip from producing a human record to consuming its reply, minus the stand-in's "
        f"fixed model time; {first['messages']:,} messages over {first['conversations']} "
        f"conversations, {first['concurrency']} in flight, read_committed client, after 20 "
        "warm-up round trips. Producer: aiokafka (murmur2 keys) or librdkafka (confluent-kafka "
        "defaults, CRC32 keys). Ratios are against the bare aiokafka loop with the same "
        "guarantee and producer (exactly_once loop: one transaction per fetched batch).",
        "",
        *_table(
            [
                "path",
                "guarantee",
                "producer",
                "overhead p50 ms",
                "p95 ms",
                "p99 ms",
                "round trip p50 ms",
                "p50 / bare",
                "p99 / bare",
            ],
            table,
        ),
    ]


def _throughput(section: dict[str, Any]) -> list[str]:
    rows = section.get("rows", [])
    if not rows:
        return []
    cases = {
        (r["path"], *_family_key(r)): {c["conversations"]: c for c in r["cases"]} for r in rows
    }
    table = []
    for guarantee, family in [_family_key(r) for r in rows if r["path"] == "worker"]:
        worker = cases[("worker", guarantee, family)]
        faust_loop = cases.get(("minimal Faust agent", guarantee, "aiokafka"), {})
        bare = cases.get(("bare aiokafka loop", guarantee, family), {})
        for conversations in sorted(worker):
            w = worker[conversations]
            f = faust_loop.get(conversations, {})
            b = bare.get(conversations, {})
            rate = w.get("messages_per_second")
            table.append(
                [
                    guarantee,
                    family,
                    conversations,
                    w.get("messages"),
                    rate,
                    w.get("cpu_percent_of_a_core"),
                    f.get("messages_per_second"),
                    b.get("messages_per_second"),
                    _ratio(rate, f.get("messages_per_second")),
                    _ratio(rate, b.get("messages_per_second")),
                ]
            )
    return [
        "## 2. Throughput",
        "",
        "Messages/s answered by one worker with an instant stand-in, history table writes "
        "included: all messages produced at once, round-robin over the conversations, timed "
        "to the last reply. Worker CPU = its CPU seconds / wall seconds. Baselines with the "
        "same guarantee: the same hop as a minimal Faust agent (same Faust settings, no "
        "table; aiokafka producer only: unpatched Faust stalls on CRC32 keys under "
        "exactly_once) and as a bare aiokafka loop with the same producer (exactly_once: one "
        "transaction per fetched batch).",
        "",
        *_table(
            [
                "guarantee",
                "producer",
                "conversations",
                "messages",
                "worker msg/s",
                "worker CPU %",
                "Faust agent msg/s",
                "bare loop msg/s",
                "worker / Faust agent",
                "worker / bare loop",
            ],
            table,
        ),
    ]


def _model(section: dict[str, Any]) -> list[str]:
    rows = section.get("rows", [])
    if not rows:
        return []
    direct = rows[0]["tokens_per_second"]
    table = [
        [
            row["path"],
            row["generations"],
            row["tokens"],
            row["seconds"],
            row["tokens_per_second"],
            row["mean_first_token_ms"],
            f"{row['tokens_per_second'] / direct:.3f}" if direct else "-",
        ]
        for row in rows
    ]
    return [
        "## 3. Model-path efficiency",
        "",
        f"Offline Gemma 3 270M ({section['model_file_bytes'] / 2**20:.0f} MiB GGUF), same "
        f'prompt ("{section["prompt"]}"), seed and max_tokens on every side, one warm-up '
        "generation each, rounds interleaved across the sides. Efficiency = tokens/s / "
        "direct tokens/s: the limit is 1.0, and a figure above it is noise (the direct side "
        "runs in the bench process, beside its Kafka client). The "
        "worker's first-token time is the mean of its "
        "`marvin_model_time_to_first_token_seconds` histogram over the measured replies.",
        "",
        *_table(
            [
                "path",
                "generations",
                "tokens",
                "seconds",
                "tokens/s",
                "first token ms",
                "efficiency",
            ],
            table,
        ),
    ]


def _memory(results: dict[str, Any]) -> list[str]:
    model = results.get("model") or {}
    if "peak_rss_kib" not in model:
        return []
    peak = model["peak_rss_kib"] * 1024
    size = model["model_file_bytes"]
    standin = (results.get("latency") or {}).get("standin_worker_peak_rss_kib", {})
    standin_peak = standin.get("exactly_once") or standin.get("at_least_once")
    rows = [["worker with the model loaded", peak / 2**20, _ratio(peak, size)]]
    if standin_peak:
        rows.append(["stand-in worker (latency run)", standin_peak / 1024, "-"])
        added = peak - standin_peak * 1024
        rows.append(["difference (the model's cost)", added / 2**20, _ratio(added, size)])
    return [
        "## 5. Memory",
        "",
        f"Peak RSS (VmHWM in /proc/<pid>/status) against the model file ({size / 2**20:.0f} MiB).",
        "",
        *_table(["process", "peak RSS MiB", "/ model file"], rows),
    ]


def _recovery(section: dict[str, Any]) -> list[str]:
    rows = section.get("rows", [])
    if not rows:
        return []
    base = rows[0]["seconds_to_answer"]
    table = []
    notes = []
    for row in rows:
        answered = row["seconds_to_answer"]
        table.append(
            [
                row["conversations"],
                row["changelog_mib"],
                row["seconds_to_ready_line"],
                answered if answered is not None else "no answer",
                round(answered - base, 2) if answered is not None and base is not None else None,
                _ratio(answered, base),
                "yes" if row["history_recovered"] else "NO",
            ]
        )
        if row.get("note"):
            notes.append(f"- {row['conversations']:,} conversations: {row['note']}")
    return [
        "## 4. Recovery",
        "",
        f"A worker with an empty data dir rebuilds the history table from its changelog "
        f"({section['turns_per_conversation']} turns per conversation), then answers a "
        "message that was waiting for it; times from the process start. The first row (an "
        "empty changelog) is the baseline: start-up alone.",
        "",
        *_table(
            [
                "conversations",
                "changelog MiB",
                "s to Ready line",
                "s to answer",
                "rebuild s (vs empty)",
                "/ empty",
                "history in reply",
            ],
            table,
        ),
        *([*notes, ""] if notes else []),
    ]


def _profile(section: dict[str, Any]) -> list[str]:
    if "samples" not in section:
        return []
    ours = section["our_functions_inclusive_percent"]
    top_self = section["top_self_percent"]
    return [
        "## Profile (py-spy, instant stand-in, under load)",
        "",
        f"{section['samples']:,} on-CPU samples (`--gil`) over {section['seconds']:g} s of a "
        "worker answering "
        f"{section['conversations']} conversations "
        f"({section['throughput_while_sampled']['messages_per_second']} msg/s while sampled); "
        f"{section['our_package_percent']}% of samples have a frame of marvin_faust on the "
        f"stack. Collapsed stacks: `{section['raw_file']}`.",
        "",
        *_table(
            ["our function (inclusive)", "% of samples"],
            [[name, pct] for name, pct in list(ours.items())[:10]],
        ),
        *_table(
            ["event-loop callback (inclusive)", "% of samples"],
            [[name, pct] for name, pct in section["by_event_loop_callback_percent"].items()],
        ),
        *_table(
            ["top self time", "% of samples"],
            [[name, pct] for name, pct in list(top_self.items())[:10]],
        ),
    ]
