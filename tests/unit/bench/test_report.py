"""The batching section in the markdown report."""

from __future__ import annotations

from typing import Any

from bench import report
from bench.batching import judge_targets


def side(tokens_per_second: float, p50: float, p95: float) -> dict[str, Any]:
    return {
        "tokens_per_second": tokens_per_second,
        "latency_p50_ms": p50,
        "latency_p95_ms": p95,
        "mean_tokens_per_reply": 128.0,
    }


def document() -> dict[str, Any]:
    rows = [
        {
            "conversations": count,
            "load_average": [1.5, 2.3],
            "engine": side(engine, 3000.0, 3100.0),
            "single": side(40.0, 3200.0, 6000.0),
            "batched_bench": {"generated_per_second": bench, "decode_per_second": bench + 2},
            "engine_over_single": round(engine / 40.0, 3),
            "engine_over_batched_bench": round(engine / bench, 3),
        }
        for count, engine, bench in ((1, 39.0, 41.0), (4, 70.0, 72.0))
    ]
    reuse = {
        "rounds": 8,
        "reply_tokens": 48,
        "prompt_tokens_mean": 137.3,
        "first_token_ms": {
            "with": {"p50": 60.0, "mean": 61.0, "max": 80.0},
            "without": {"p50": 400.0, "mean": 410.0, "max": 500.0},
        },
        "reused_tokens_mean": {"with": 120.3, "without": 1.0},
        "ratio_p50": 0.15,
    }
    memory = {
        "n_ctx": 2048,
        "max_tokens": 32,
        "rows": [
            {
                "cache": "n_ctx x slots",
                "n_parallel": n,
                "kv_size": 2048 * n,
                "rss_loaded_kib": 434_200,
                "peak_rss_kib": 442_104 + (n - 1) * 7 * 1024,
                "llama_buffers_mib": {"KV": 36.0, "output": float(n), "compute": 514.5},
                "peak_mib_per_extra_slot": 7.0 if n > 1 else None,
            }
            for n in (1, 4)
        ],
    }
    batching = {
        "setup": {
            "n_ctx": 2048,
            "n_batch": 512,
            "generation_threads": 1,
            "prompt_threads": 2,
            "max_tokens": 128,
            "rounds": 3,
        },
        "throughput": {"prompt_tokens_median": 20, "rows": rows},
        "reuse": reuse,
        "memory": memory,
        "targets": judge_targets(rows, reuse["ratio_p50"]),
    }
    return {
        "started_at": "20261202T150000Z",
        "mode": "full",
        "machine": {
            "cores": 2,
            "cpu_model": "test CPU",
            "memory_gib": 8,
            "load_average_at_start": [1.0, 1.0, 1.0],
        },
        "settings": {},
        "worker_settings": {},
        "results": {"batching": batching},
    }


def test_the_batching_section_has_its_tables_and_targets() -> None:
    text = report.markdown(document())
    assert "## 7. Several conversations at once" in text
    assert (
        "| 4 | 70.00 | 3,000 / 3,100 | 128 | 40.00 | 3,200 / 6,000 | 72.00 | 74.00 | 1.750 | "
        "0.972 | 1.5 - 2.3 |"
    ) in text
    assert "| with | 60.00 | 61.00 | 80.00 | 120 |" in text
    assert "| n_ctx x slots | 4 | 8,192 | 424 | 453 | 36.00 | 4.00 | 514 | 7.00 |" in text
    assert "4 conversations >= 2x the single sequence: 1.750x" in text
    assert ">= 0.9 of llama-batched-bench at every count (1: 0.951, 4: 0.972): met" in text
    assert "first token with reuse <= 0.3x without: 0.150x: met" in text


def test_a_section_that_failed_before_measuring_renders_nothing() -> None:
    doc = document()
    doc["results"]["batching"] = {"setup": doc["results"]["batching"]["setup"]}
    assert "Several conversations" not in report.markdown(doc)
