"""The batching section's arithmetic: percentiles, ratios, pooled rates, per-slot memory and the
targets' verdicts."""

from __future__ import annotations

import statistics

import pytest

from bench.batched_bench import BenchRow
from bench.batching import (
    judge_targets,
    llama_buffers_mib,
    per_slot_mib,
    percentile,
    pooled_rates,
    queued_latencies,
    ratio,
    rotation,
    transcript,
)
from marvin_faust.llm.llamacpp import PLAIN_TEMPLATE


def test_percentile_interpolates_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 95) == pytest.approx(3.85)
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


def test_percentile_agrees_with_the_standard_librarys_inclusive_quantiles() -> None:
    values = [0.31, 0.12, 0.55, 0.48, 0.9, 0.27, 0.61, 0.05, 0.77, 0.34, 0.42]
    quantiles = statistics.quantiles(values, n=20, method="inclusive")
    assert percentile(values, 95) == pytest.approx(quantiles[18])
    assert percentile(values, 50) == pytest.approx(statistics.median(values))


def test_ratio() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 3.0, 2) == 0.33
    assert ratio(1.0, 0.0) is None
    assert ratio(None, 2.0) is None
    assert ratio(1.0, None) is None


def test_requests_served_one_after_the_other_wait_for_those_before() -> None:
    assert queued_latencies([2.0, 3.0, 1.0]) == [2.0, 5.0, 6.0]
    assert queued_latencies([]) == []


def test_each_side_goes_first_in_turn() -> None:
    sides = ("engine", "single", "batched-bench")
    orders = [rotation(sides, index) for index in range(4)]
    assert orders == [
        ["engine", "single", "batched-bench"],
        ["single", "batched-bench", "engine"],
        ["batched-bench", "engine", "single"],
        ["engine", "single", "batched-bench"],
    ]


def row(sequences: int, seconds: float, decode_seconds: float, tg: int = 100) -> BenchRow:
    return BenchRow(
        20, tg, sequences, 0, seconds - decode_seconds, 0, decode_seconds, 0, seconds, 0
    )


def test_batched_bench_runs_pool_all_tokens_over_all_time() -> None:
    runs = [[row(1, 4.0, 3.5), row(4, 8.0, 7.0)], [row(1, 6.0, 5.5), row(4, 8.0, 7.0)]]
    rates = pooled_rates(runs)
    assert rates[1] == {"generated_per_second": 20.0, "decode_per_second": 22.22}
    assert rates[4] == {"generated_per_second": 50.0, "decode_per_second": 57.14}
    assert pooled_rates([]) == {}


def test_memory_per_extra_slot_is_against_one_slot() -> None:
    peaks = {1: 400 * 1024, 2: 402 * 1024, 4: 406 * 1024, 8: 414 * 1024}
    assert per_slot_mib(peaks) == {2: 2.0, 4: 2.0, 8: 2.0}
    assert per_slot_mib({2: 1024, 4: 2048}) == {}


def test_llama_cpps_buffer_sizes_are_read_from_its_log() -> None:
    log = (
        "llama_context:        CPU  output buffer size =     4.00 MiB\n"
        "llama_kv_cache:        CPU KV buffer size =     6.00 MiB\n"
        "llama_kv_cache: size =    6.00 MiB (  2048 cells,   3 layers,  4/1 seqs)\n"
        "llama_kv_cache:        CPU KV buffer size =    30.00 MiB\n"
        "sched_reserve:        CPU compute buffer size =   514.50 MiB\n"
    )
    assert llama_buffers_mib(log) == {"output": 4.0, "KV": 36.0, "compute": 514.5}
    assert llama_buffers_mib("") == {}


def throughput_row(count: int, engine: float, single: float, bench: float | None) -> dict:
    return {
        "conversations": count,
        "engine_over_single": ratio(engine, single),
        "engine_over_batched_bench": ratio(engine, bench),
        "batched_bench": {} if bench is None else {"generated_per_second": bench},
    }


def test_targets_met() -> None:
    rows = [throughput_row(1, 38, 40, 41), throughput_row(4, 100, 40, 105)]
    targets = judge_targets(rows, 0.12)
    assert targets["speedup_at_4"]["value"] == 2.5
    assert targets["speedup_at_4"]["batched_bench_headroom"] == pytest.approx(2.561)
    assert targets["speedup_at_4"]["verdict"] == "met"
    assert targets["of_batched_bench"]["values"] == {1: 0.927, 4: 0.952}
    assert targets["of_batched_bench"]["verdict"] == "met"
    assert targets["reuse_first_token"]["verdict"] == "met"


def test_no_speedup_target_where_batched_bench_has_no_headroom() -> None:
    rows = [throughput_row(1, 38, 40, 41), throughput_row(4, 50, 40, 60)]
    verdict = judge_targets(rows, None)["speedup_at_4"]["verdict"]
    assert verdict == "not applicable: llama-batched-bench itself gains 1.46x at 4"


def test_targets_missed() -> None:
    rows = [throughput_row(1, 30, 40, 41), throughput_row(4, 70, 40, 105)]
    targets = judge_targets(rows, 0.5)
    assert targets["speedup_at_4"]["verdict"] == "missed"
    assert targets["of_batched_bench"]["verdict"] == "missed at 1, 4"
    assert targets["reuse_first_token"]["verdict"] == "missed"


def test_without_batched_bench_only_the_speedup_is_judged() -> None:
    rows = [throughput_row(1, 38, 40, None), throughput_row(4, 70, 40, None)]
    targets = judge_targets(rows, None)
    assert targets["speedup_at_4"]["verdict"] == "missed"
    assert set(targets) == {"speedup_at_4"}


def test_the_transcript_is_the_plain_prompt_format() -> None:
    from jinja2 import Template

    turns = [("Hi", "Go away."), ("Why?", "Life. Don't talk to me about life.")]
    messages = [{"role": "system", "content": "You are Marvin."}]
    for human, marvin in turns:
        messages += [{"role": "user", "content": human}, {"role": "assistant", "content": marvin}]
    messages.append({"role": "user", "content": "Really?"})
    rendered = Template(PLAIN_TEMPLATE).render(
        messages=messages, bos_token="", add_generation_prompt=True
    )
    assert transcript("You are Marvin.", turns, "Really?") == rendered
