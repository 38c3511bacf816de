"""Reading llama-batched-bench's output, and the command line it gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import batched_bench
from bench.batched_bench import BenchRow, parse_table

# Its output on this machine (llama-cpp-python 0.3.36's llama.cpp), log lines around the table.
OUTPUT = """\
llama_context: n_seq_max             = 8
llama_batched_bench: n_kv_max = 2048, n_batch = 512, n_ubatch = 512, flash_attn = -1, \
is_pp_shared = 0, is_tg_separate = 0, n_gpu_layers = 0, n_threads = 1, n_threads_batch = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    20 |    128 |    1 |    148 |    0.042 |   476.19 |    3.301 |    38.78 |    3.343 |    44.27 |
|    20 |    128 |    2 |    296 |    0.061 |   655.74 |    5.120 |    50.00 |    5.181 |    57.13 |
|    20 |    128 |    4 |    592 |    0.101 |   792.08 |    7.900 |    64.81 |    8.001 |    73.99 |

llama_perf_context_print:        load time =     412.33 ms
"""


def test_reads_every_row_of_the_table() -> None:
    rows, _ = parse_table(OUTPUT)
    assert [row.sequences for row in rows] == [1, 2, 4]
    assert rows[1] == BenchRow(
        prompt_tokens=20,
        generated_tokens=128,
        sequences=2,
        kv_cells=296,
        prompt_seconds=0.061,
        prompt_per_second=655.74,
        generation_seconds=5.12,
        generation_per_second=50.0,
        seconds=5.181,
        tokens_per_second=57.13,
    )


def test_reads_the_settings_line() -> None:
    _, settings = parse_table(OUTPUT)
    assert settings["n_kv_max"] == "2048"
    assert settings["n_threads"] == "1"
    assert settings["n_threads_batch"] == "2"


def test_generated_tokens_over_the_whole_time_count_the_prompts_time_too() -> None:
    rows, _ = parse_table(OUTPUT)
    four = rows[2]
    assert four.generated_per_second == pytest.approx(4 * 128 / 8.001)
    assert four.generated_per_second < four.generation_per_second  # S_TG leaves prompts out
    assert four.as_dict()["generated_per_second"] == round(4 * 128 / 8.001, 2)


def test_output_without_a_table_has_no_rows() -> None:
    assert parse_table("error: unable to load model\n") == ([], {})


def test_the_command_gives_the_engines_settings() -> None:
    command = batched_bench.command(
        Path("/cache/llama-batched-bench"),
        Path("/models/gemma.gguf"),
        prompt_tokens=20,
        generated_tokens=128,
        sequences=[1, 2, 4, 8],
        n_ctx=2048,
        n_batch=512,
        threads=1,
        threads_batch=2,
        gpu_layers=0,
        swa_full=True,
    )
    options = dict(zip(command[1::2], command[2::2], strict=False))
    assert command[0] == "/cache/llama-batched-bench"
    assert options["-m"] == "/models/gemma.gguf"
    assert (options["-npp"], options["-ntg"], options["-npl"]) == ("20", "128", "1,2,4,8")
    assert (options["-c"], options["-b"], options["-t"], options["-tb"]) == (
        "2048",
        "512",
        "1",
        "2",
    )
    assert "--kv-unified" in command
    assert "--swa-full" in command


def test_the_binary_is_cached_per_version_outside_the_checkout() -> None:
    path = batched_bench.cached_binary("0.3.36")
    assert path.parent.name == "0.3.36"
    assert path.name == "llama-batched-bench"
    assert Path(__file__).resolve().parents[3] not in path.parents


def test_a_missing_compiler_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(batched_bench, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(batched_bench.shutil, "which", lambda tool: None)
    with pytest.raises(batched_bench.BuildError, match="missing cmake, make, a C\\+\\+ compiler"):
        batched_bench.ensure_binary("0.3.36")
