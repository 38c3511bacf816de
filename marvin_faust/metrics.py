"""Prometheus metrics of our own, served at ``/metrics`` next to Faust's sensor metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .llm import Generation

REGISTRY = CollectorRegistry()

MESSAGES = Counter(
    "marvin_messages",
    "Chat records handled, by outcome (answered, dead-lettered, dropped, greeting, duplicate).",
    ["outcome"],
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "marvin_dead_letters",
    "Records sent to the dead-letter topic, by cause (bad message, model, internal).",
    ["cause"],
    registry=REGISTRY,
)
MODEL_LATENCY = Histogram(
    "marvin_model_latency_seconds",
    "Seconds the model took to produce a whole reply.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320),
    registry=REGISTRY,
)
MODEL_FIRST_TOKEN = Histogram(
    "marvin_model_time_to_first_token_seconds",
    "Seconds from the model call to the first streamed token.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
MODEL_TOKENS_PER_SECOND = Histogram(
    "marvin_model_tokens_per_second",
    "Generated tokens per second of each reply.",
    buckets=(1, 2, 5, 10, 20, 30, 40, 50, 75, 100, 200, 500, 1000),
    registry=REGISTRY,
)
ACTIVE_CONVERSATIONS = Gauge(
    "marvin_active_conversations",
    "Conversations with stored history in this worker's table partitions.",
    registry=REGISTRY,
)


def observe_generation(generation: Generation) -> None:
    MODEL_LATENCY.observe(generation.seconds)
    if generation.first_token_seconds is not None:
        MODEL_FIRST_TOKEN.observe(generation.first_token_seconds)
    if generation.seconds > 0:
        MODEL_TOKENS_PER_SECOND.observe(generation.tokens_per_second)
