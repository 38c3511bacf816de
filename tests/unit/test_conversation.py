"""``marvin_faust.conversation``: turns, the history window and the prompt.

``history_window`` is LangChain's ``trim_messages`` (last, start on human), computed cheaply. The
window used to be ``trim_messages`` itself; it now walks the turns (see its docstring for why).
LangChain stays the reference: on many random histories both give the same messages.
"""

from __future__ import annotations

import random

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, trim_messages

from marvin_faust.conversation import (
    append_turns,
    build_prompt,
    has_message,
    history_window,
    make_turn,
    to_messages,
)

AI = "AI"


def words(text: str) -> int:
    return len(text.split())


def turns(*pairs: tuple[str, str]) -> list:
    return [make_turn(role, text, i, f"id-{i}") for i, (role, text) in enumerate(pairs)]


def test_append_turns_returns_a_new_bounded_list():
    history = turns(("human", "a"), ("AI", "b"), ("human", "c"))
    new = turns(("AI", "d"))
    combined = append_turns(history, new, max_turns=3)
    assert combined is not history
    assert [t["text"] for t in combined] == ["b", "c", "d"]
    assert [t["text"] for t in history] == ["a", "b", "c"]  # the input is untouched


def test_has_message_matches_ids_and_ignores_missing_ids():
    history = turns(("human", "a"))
    assert has_message(history, "id-0")
    assert not has_message(history, "id-9")
    assert not has_message(history, None)


def test_history_window_keeps_the_newest_turns_that_fit_the_budget():
    history = turns(("human", "one two"), ("AI", "three four"), ("human", "five"), ("AI", "six"))
    # 2 + 2 + 1 + 1 = 6 tokens in all
    assert history_window(history, 6, words, "AI") == [
        HumanMessage("one two"),
        AIMessage("three four"),
        HumanMessage("five"),
        AIMessage("six"),
    ]
    # one token short: the oldest pair no longer fits; the window starts on a human turn
    assert history_window(history, 5, words, "AI") == [HumanMessage("five"), AIMessage("six")]


def test_history_window_at_the_budget_edge_drops_a_turn_one_token_over():
    history = turns(("human", "a b c"), ("AI", "d e"))
    assert len(history_window(history, 5, words, "AI")) == 2
    # 4 tokens: only "d e" fits, which is an AI turn: a window may not start on it
    assert history_window(history, 4, words, "AI") == []


def test_history_window_with_no_budget_or_history_is_empty():
    assert history_window(turns(("human", "a")), 0, words, "AI") == []
    assert history_window([], 300, words, "AI") == []


def test_build_prompt_orders_persona_history_then_new_message():
    prompt = build_prompt("be bored", [HumanMessage("hi"), AIMessage("sigh")], "why?")
    assert prompt == [
        SystemMessage("be bored"),
        HumanMessage("hi"),
        AIMessage("sigh"),
        HumanMessage("why?"),
    ]


# -- history_window against LangChain's trim_messages ---------------------------------------


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
    history = []
    for index in range(rng.randint(0, 30)):
        role = rng.choice(["human", AI, AI] if index else ["human", AI])
        text = " ".join(f"w{index}-{n}" for n in range(rng.randint(0, 9)))
        history.append(make_turn(role, text, index, f"id-{index}"))
    return history


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
