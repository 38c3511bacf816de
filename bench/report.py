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
        ("streaming", _streaming),
        ("recovery", _recovery),
        ("memory", _memory),
        ("batching", _batching),
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


def _percentiles(summary: dict[str, Any]) -> str:
    """ "p50 / p95" of a summary in ms, or p50 alone when there were too few runs for a p95."""
    if summary.get("p95") is None:
        return _cell(summary.get("p50"))
    return f"{_cell(summary['p50'])} / {_cell(summary['p95'])}"


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _judged(interval: list[float], floor: float) -> str:
    """Whether a ratio known to lie in ``interval`` (95%) is at least ``floor``."""
    low, high = interval
    if low >= floor:
        return "met"
    if high < floor:
        return "missed"
    return "not resolved (the interval spans it)"


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def _streaming(section: dict[str, Any]) -> list[str]:
    if "first_token_visible_ms" not in section:
        return []
    visible, model = section["first_token_visible_ms"], section["model_first_token_ms"]
    extra = visible["p50"] - model["p50"]
    per_round = section["first_token_visible_minus_model_ms"]
    target_extra = section["targets"]["first_token_visible_minus_model_p50_ms"]
    final = section["final_reply_ms"]
    tokens, cpu = section["tokens"], section["cpu_ms_per_reply"]
    target_ratio = section["targets"]["tokens_per_second_ratio"]
    spread = "p50 / p95" if visible.get("p95") is not None else "p50"
    rows = [
        [
            f"first token visible at the client, {spread} ms",
            _percentiles(visible),
            f"model's time to first token, same generations: {_percentiles(model)}",
            f"{extra:+.1f} ms (per round p50 {per_round['p50']:+.1f})",
            f"<= +{target_extra:g} ms at p50: {_met(extra <= target_extra)}",
        ],
        [
            f"final reply at the client, {spread} ms",
            _percentiles(final["on"]),
            f"streaming off: {_percentiles(final['off'])}",
            _ratio(final["on"]["p50"], final["off"]["p50"]),
            "-",
        ],
        *(
            [
                label,
                tokens[kind]["on"]["tokens_per_second"],
                f"streaming off: {_cell(tokens[kind]['off']['tokens_per_second'])}",
                f"{_fraction(tokens[kind]['ratio'])} (95%: "
                + " - ".join(map(_fraction, tokens[kind]["ratio_interval_95"]))
                + ")",
                target,
            ]
            for kind, label, target in (
                (
                    "worker",
                    "tokens/s, the worker's generations (its log)",
                    f">= {target_ratio:g}: "
                    + _judged(tokens["worker"]["ratio_interval_95"], target_ratio),
                ),
                ("decode", "tokens/s after the first token (decoding alone)", "-"),
                ("end_to_end", "tokens/s end to end (tokens / time to final reply)", "-"),
            )
        ),
        [
            "CPU ms per reply: worker / broker / client",
            " / ".join(_cell(cpu["on"][process]) for process in ("worker", "broker", "client")),
            "streaming off: "
            + " / ".join(_cell(cpu["off"][process]) for process in ("worker", "broker", "client")),
            " / ".join(
                _ratio(cpu["on"][process], cpu["off"][process])
                for process in ("worker", "broker", "client")
            ),
            "-",
        ],
        [
            "model's time to first token, p50 ms",
            model["p50"],
            f"streaming off: {_cell(section['off_model_first_token_ms']['p50'])}",
            _ratio(model["p50"], section["off_model_first_token_ms"]["p50"]),
            "-",
        ],
    ]
    rounds = section["rounds"]
    return [
        "## 4. Streaming",
        "",
        f"Two workers on the offline Gemma 3 270M (llama.cpp), same seed and max_tokens, "
        f"running together: one streaming (chunks every {section['stream_interval']:g} s or "
        "16 tokens, the first token at once), one with `MARVIN_STREAM_TOPIC=` (off). "
        f"{rounds} rounds after one warm-up, each asking both the same prompt (one of "
        f"{len(section['prompts'])}) in a fresh conversation, the order alternating (p95 "
        "from 20 rounds on). The client is `ChatClient(stream=True)` (stream and chat "
        "topics, read_committed); times run from just before the human record goes to its "
        "producer. The model's time to first token is the streaming worker's "
        "`marvin_model_time_to_first_token_seconds` for each of these generations. Same "
        f"replies on and off: {section['same_replies']} "
        f"of {rounds}; streamed text = reply: {section['streamed_text_matches_reply']} of "
        f"{rounds}; {section['mean_chunks_per_reply']} chunks per reply. tokens/s = all "
        "tokens / all seconds; 95%: a bootstrap interval of the ratio over the rounds (one "
        "generation's time varies by tens of percent here). CPU: user + system seconds of "
        "each process while that side's rounds "
        "ran (client: the bench process); the broker and the clients share the machine's "
        "cores with the model.",
        "",
        *_table(
            [
                "measurement",
                "streaming on",
                "baseline (same rounds)",
                "difference / ratio",
                "target",
            ],
            rows,
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
        "## 6. Memory",
        "",
        f"Peak RSS (VmHWM in /proc/<pid>/status) against the model file ({size / 2**20:.0f} MiB).",
        "",
        *_table(["process", "peak RSS MiB", "/ model file"], rows),
    ]


def _ms_pair(side: dict[str, Any]) -> str:
    return f"{_cell(side.get('latency_p50_ms'))} / {_cell(side.get('latency_p95_ms'))}"


def _batching(section: dict[str, Any]) -> list[str]:
    throughput = section.get("throughput")
    if not throughput:
        return []
    setup = section["setup"]
    rows = []
    for row in throughput["rows"]:
        engine, single, bench = row["engine"], row["single"], row["batched_bench"]
        rows.append(
            [
                row["conversations"],
                engine["tokens_per_second"],
                _ms_pair(engine),
                engine["mean_tokens_per_reply"],
                single["tokens_per_second"],
                _ms_pair(single),
                bench.get("generated_per_second"),
                bench.get("decode_per_second"),
                _fraction(row["engine_over_single"]),
                _fraction(row["engine_over_batched_bench"]),
                " - ".join(f"{value:.1f}" for value in row.get("load_average", [])) or "-",
            ]
        )
    lines = [
        "## 7. Several conversations at once",
        "",
        f"The continuous-batching engine (`BatchedEngine`, n_parallel = the count, n_ctx "
        f"{setup['n_ctx']} per conversation, a unified KV cache of n_ctx x n_parallel cells) "
        "given that "
        f"many conversations at the same moment, each its own prompt of about "
        f"{throughput['prompt_tokens_median']} tokens asking for a long story, greedy, "
        f"{setup['max_tokens']} tokens per reply at most; {setup['rounds']} rounds per count, "
        "each running the three sides one after the other, a different one first each round. "
        "Aggregate tokens/s = all tokens generated / time to the last reply; a reply's latency "
        "runs from its submit to its end. Single sequence: `Llama.create_completion` (the "
        "high-level API) on the same prompts one after the other, in the same rounds (its "
        "latencies include the replies before: they all arrived together). "
        "llama-batched-bench: llama.cpp's own, built from the llama.cpp that llama-cpp-python "
        "vendors, same GGUF, context (-c) the engine's KV cache, batch "
        f"{setup['n_batch']}, unified KV cache, -t and -tb "
        f"{setup['generation_threads']} (the engine's generation threads; it evaluates prompts "
        f"on {setup['prompt_threads']}), once in each round; "
        "B x TG / T counts its generated tokens over its whole time, prompts included, as the "
        "engine's figure does; S_TG is its decoding alone.",
        "",
        *_table(
            [
                "conversations",
                "engine tokens/s",
                "engine reply p50 / p95 ms",
                "tokens per reply",
                "single tokens/s",
                "single reply p50 / p95 ms",
                "batched-bench B*TG/T",
                "batched-bench S_TG",
                "engine / single",
                "engine / batched-bench",
                "load average",
            ],
            rows,
        ),
    ]
    reuse = section.get("reuse")
    if reuse:
        first, reused = reuse["first_token_ms"], reuse["reused_tokens_mean"]
        lines += [
            f"Time to first token of a conversation's 5th turn ({reuse['rounds']} "
            f"conversations, prompts of {reuse['prompt_tokens_mean']} tokens on average, "
            f"replies of at most {reuse['reply_tokens']} tokens before it), one slot: with "
            "the same session id every turn, and the same prompt without a session after "
            "another prompt took the slot.",
            "",
            *_table(
                ["5th turn", "first token p50 ms", "mean ms", "max ms", "reused tokens (mean)"],
                [
                    [
                        case,
                        first[case]["p50"],
                        first[case]["mean"],
                        first[case]["max"],
                        reused[case],
                    ]
                    for case in ("with", "without")
                ],
            ),
        ]
    memory = section.get("memory")
    if memory:
        lines += [
            f"Memory by slots: one child process each, n_ctx {memory['n_ctx']} per "
            "conversation, that many conversations of "
            f"{memory['max_tokens']} tokens at once; KV cache: the engine's default (n_ctx x "
            "slots cells, unified) or one cache of n_ctx cells all slots share. Buffers: "
            "llama.cpp's own log; per extra slot: (peak RSS - peak RSS with 1 slot) / (slots - 1).",
            "",
            *_table(
                [
                    "KV cache",
                    "slots",
                    "KV cells",
                    "RSS loaded MiB",
                    "peak RSS MiB",
                    "KV buffers MiB",
                    "output buffer MiB",
                    "compute buffer MiB",
                    "peak MiB per extra slot",
                ],
                [
                    [
                        row.get("cache", "-"),
                        row["n_parallel"],
                        row.get("kv_size"),
                        row["rss_loaded_kib"] / 1024,
                        row["peak_rss_kib"] / 1024,
                        row["llama_buffers_mib"].get("KV"),
                        row["llama_buffers_mib"].get("output"),
                        row["llama_buffers_mib"].get("compute"),
                        row["peak_mib_per_extra_slot"],
                    ]
                    for row in memory["rows"]
                ],
            ),
        ]
    targets = section.get("targets", {})
    if targets:
        lines += ["Targets:", ""]
        if speedup := targets.get("speedup_at_4"):
            lines.append(
                f"- 4 conversations >= {speedup['target']:g}x the single sequence: "
                f"{_fraction(speedup['value'])}x (llama-batched-bench: "
                f"{_fraction(speedup['batched_bench_headroom'])}x its 1): {speedup['verdict']}"
            )
        if share := targets.get("of_batched_bench"):
            values = ", ".join(f"{count}: {value:.3f}" for count, value in share["values"].items())
            lines.append(
                f"- >= {share['target']:g} of llama-batched-bench at every count ({values}): "
                f"{share['verdict']}"
            )
        if first := targets.get("reuse_first_token"):
            lines.append(
                f"- 5th turn's first token with reuse <= {first['target']:g}x without: "
                f"{_fraction(first['value'])}x: {first['verdict']}"
            )
        lines.append("")
    return lines


def _recovery(section: dict[str, Any]) -> list[str]:
    rows = section.get("rows", [])
    if not rows:
        return []
    base = rows[0]["seconds_to_answer"]
    table = []
    notes = []
    for row in rows:
        answered = row["seconds_to_answer"]
        values, tombstones = row.get("changelog_values"), row.get("changelog_tombstones")
        table.append(
            [
                row.get("case", ""),
                row["conversations"],
                row.get("start", "empty data dir"),
                row["changelog_mib"],
                "" if values is None else f"{values:,} / {tombstones:,}",
                row["seconds_to_ready_line"],
                answered if answered is not None else "no answer",
                round(answered - base, 2) if answered is not None and base is not None else None,
                _ratio(answered, base),
                "yes" if row["history_recovered"] else "NO",
            ]
        )
        if row.get("note"):
            notes.append(f"- {row['case']}, {row['conversations']:,}: {row['note']}")
    expiry = section.get("expiry")
    retention = (
        [
            f"Retention rows: {expiry['expired']:,} of the conversations were idle for twice "
            "the TTL of a worker that expired them first (in "
            f"{expiry['seconds_to_expire_all']} s from its Ready line); 'compacted' after the "
            "broker's cleaner ran on the changelog. Values / tombstones: the records a "
            "recovery reads (MiB: the values' bytes).",
            "",
        ]
        if expiry
        else []
    )
    return [
        "## 5. Recovery",
        "",
        f"A worker with an empty data dir rebuilds the history table from its changelog "
        f"({section['turns_per_conversation']} turns per conversation), then answers a "
        "message that was waiting for it; times from the process start. The first row (an "
        "empty changelog) is the baseline: start-up alone. The 'restart on its own' row "
        "restarts the worker that rebuilt the most on its own data dir, after its clean stop.",
        "",
        *retention,
        *_table(
            [
                "case",
                "conversations",
                "data dir",
                "changelog MiB",
                "values / tombstones",
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
