"""``history_window`` is LangChain's ``trim_messages`` (last, start on human), computed cheaply.

The window used to be ``trim_messages`` itself; it now walks the turns (see its docstring for
why). LangChain stays the reference: on many random histories both give the same messages.
"""

from __future__ import annotations

import random

import pytest
from langchain_core.messages import trim_messages

from marvin_faust.conversation import history_window, make_turn, to_messages

AI = "AI"


def words(text: str) -> int:
    return len(text.split())


def reference(history: list, budget: int) -> list:
    if budget <= 0 or not history:
        return []
    return trim_messages(
        to_messages(history, AI),
        max_tokens=budget,
        token_counter=lambda messages: sum(words(str(m.content)) for m in messages),
        strategy="last",
        start_on="human",
        allow_partial=False,
    )


def random_history(rng: random.Random) -> list:
    turns = []
    for index in range(rng.randint(0, 30)):
        role = rng.choice(["human", AI, AI] if index else ["human", AI])
        text = " ".join(f"w{index}-{n}" for n in range(rng.randint(0, 9)))
        turns.append(make_turn(role, text, index, f"id-{index}"))
    return turns


@pytest.mark.parametrize("seed", range(20))
def test_history_window_equals_trim_messages_on_random_histories(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        history = random_history(rng)
        budget = rng.randint(-1, 60)
        assert history_window(history, budget, words, AI) == reference(history, budget), (
            history,
            budget,
        )


def test_history_window_counts_each_turn_at_most_once() -> None:
    history = [make_turn("human" if i % 2 == 0 else AI, "a b", i, None) for i in range(200)]
    counted: list[str] = []

    def counting(text: str) -> int:
        counted.append(text)
        return words(text)

    window = history_window(history, 10, counting, AI)
    assert len(window) == 4  # 5 turns of 2 tokens fit; the oldest of them is an AI turn
    assert len(counted) == 6  # the five that fit and the one that did not
