"""Prometheus metrics of our own, served at ``/metrics`` next to Faust's sensor metrics.

One :class:`Metrics` per app, each with a registry of its own: two apps in one process (tests)
do not collide on metric names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .llm import Generation


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "marvin_messages",
            "Chat records handled, by outcome (answered, dead-lettered, dropped, greeting, "
            "duplicate).",
            ["outcome"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "marvin_dead_letters",
            "Records sent to the dead-letter topic, by cause (bad message, model, internal).",
            ["cause"],
            registry=self.registry,
        )
        self.model_latency = Histogram(
            "marvin_model_latency_seconds",
            "Seconds the model took to produce a whole reply.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320),
            registry=self.registry,
        )
        self.model_first_token = Histogram(
            "marvin_model_time_to_first_token_seconds",
            "Seconds from the model call to the first streamed token.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.model_tokens_per_second = Histogram(
            "marvin_model_tokens_per_second",
            "Generated tokens per second of each reply.",
            buckets=(1, 2, 5, 10, 20, 30, 40, 50, 75, 100, 200, 500, 1000),
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "marvin_model_prompt_tokens",
            "Prompt tokens of the replies: 'evaluated' by the model, or 'reused' from the "
            "conversation's KV cache of its last turn.",
            ["cache"],
            registry=self.registry,
        )
        self.conversations_stored = Gauge(
            "marvin_conversations_stored",
            "Conversations with stored history in the table partitions this worker owns.",
            registry=self.registry,
        )
        self.conversations_expired = Counter(
            "marvin_conversations_expired",
            "Conversations deleted for being idle longer than MARVIN_CONVERSATION_TTL.",
            registry=self.registry,
        )
        self.conversations_forgotten = Counter(
            "marvin_conversations_forgotten",
            "Conversations deleted on request (marvin-faust forget, DELETE).",
            registry=self.registry,
        )

    def observe_generation(self, generation: Generation) -> None:
        self.model_latency.observe(generation.seconds)
        if generation.first_token_seconds is not None:
            self.model_first_token.observe(generation.first_token_seconds)
        if generation.seconds > 0:
            self.model_tokens_per_second.observe(generation.tokens_per_second)
        evaluated = generation.prompt_tokens - generation.reused_tokens
        self.prompt_tokens.labels(cache="evaluated").inc(evaluated)
        self.prompt_tokens.labels(cache="reused").inc(generation.reused_tokens)
