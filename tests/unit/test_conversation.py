"""``marvin_faust.conversation``: turns, the history window and the prompt.

The history window's rule (``history_window``'s docstring) is checked on examples, then as
properties on many random histories and budgets.
"""

from __future__ import annotations

import random

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from marvin_faust.conversation import (
    append_turns,
    build_prompt,
    end_within,
    has_message,
    history_window,
    make_turn,
    to_messages,
)
from marvin_faust.llm import StandInBackend

AI = "AI"


# The stand-in's tokenizer: tokens are words.
WORDS = StandInBackend()


def words(text: str) -> int:
    return WORDS.count_tokens(text)


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
    assert history_window(history, 6, WORDS, AI) == to_messages(history, AI)
    # one token short: "one two" no longer fits whole, and the window may not start on the AI
    # turn after it: the end of "one two" opens it, in the one token left
    assert history_window(history, 5, WORDS, AI) == [
        HumanMessage("two"),
        AIMessage("three four"),
        HumanMessage("five"),
        AIMessage("six"),
    ]
    # no token left for it: an empty human turn opens the window
    assert history_window(history, 4, WORDS, AI) == [
        HumanMessage(""),
        AIMessage("three four"),
        HumanMessage("five"),
        AIMessage("six"),
    ]
    assert history_window(history, 2, WORDS, AI) == [HumanMessage("five"), AIMessage("six")]


def test_a_newest_turn_over_the_budget_leaves_its_end():
    history = turns(("human", "why so sad"), ("AI", "a b c d e f g h"))
    # the reply alone is 8 tokens: its last 5 are kept, and nothing is left for the question
    assert history_window(history, 5, WORDS, AI) == [HumanMessage(""), AIMessage("d e f g h")]
    assert history_window(history, 1, WORDS, AI) == [HumanMessage(""), AIMessage("h")]
    # one token over the reply: the end of the question opens the window
    assert history_window(history, 9, WORDS, AI) == [
        HumanMessage("sad"),
        AIMessage("a b c d e f g h"),
    ]


def test_the_greeting_is_in_the_window_after_an_empty_human_turn():
    greeting = "Hello, my name is Marvin. What do you want?"
    history = turns(("AI", greeting))
    assert history_window(history, 300, WORDS, AI) == [HumanMessage(""), AIMessage(greeting)]
    history = turns(("AI", greeting), ("human", "Nothing."), ("AI", "Fine."))
    assert history_window(history, 300, WORDS, AI) == [
        HumanMessage(""),
        *to_messages(history, AI),
    ]


def test_history_window_with_no_budget_or_history_is_empty():
    assert history_window(turns(("human", "a")), 0, WORDS, AI) == []
    assert history_window([], 300, WORDS, AI) == []


def test_the_stand_in_cuts_text_at_its_tokens_keeping_their_spacing():
    assert WORDS.last_tokens("one  two\nthree ", 2) == "two\nthree "
    assert WORDS.last_tokens("one two", 5) == "one two"
    assert WORDS.last_tokens("one two", 0) == ""


class Retokenizing:
    """A tokenizer whose cut text can count more tokens than it was cut to, as a real one's
    can: text cut from a longer one counts one token more per 3 words (at least one)."""

    def count_tokens(self, text: str) -> int:
        n = words(text)
        return n + max(1, n // 3) if text.startswith("~") else n

    def last_tokens(self, text: str, count: int) -> str:
        end = WORDS.last_tokens(text, count)
        return "~" + end if end and end != text else end


def test_end_within_cuts_again_when_the_cut_counts_more_tokens():
    text = " ".join(f"w{i}" for i in range(20))
    # The first cut, 6 words, counts 8 tokens: cut again 2 shorter, 4 words count 5.
    assert end_within(text, 6, Retokenizing()) == "~w16 w17 w18 w19"
    # 1 word counts 2: nothing fits.
    assert end_within(text, 1, Retokenizing()) == ""


def test_build_prompt_orders_persona_history_then_new_message():
    prompt = build_prompt("be bored", [HumanMessage("hi"), AIMessage("sigh")], "why?")
    assert prompt == [
        SystemMessage("be bored"),
        HumanMessage("hi"),
        AIMessage("sigh"),
        HumanMessage("why?"),
    ]


# -- the rule as properties, on random histories ------------------------------------------


def random_history(rng: random.Random) -> list:
    """A stored history as the agent writes it: maybe a greeting, then (human, AI) pairs, the
    oldest dropped beyond a bound (so it may start on either role)."""
    history = []
    if rng.random() < 0.5:
        history.append(("AI", "Hello, my name is Marvin. What do you want?"))
    for _ in range(rng.randint(0, 12)):
        history += [("human", random_text(rng)), (AI, random_text(rng))]
    history = history[rng.randint(0, min(3, len(history))) :]
    return [make_turn(role, text, i, f"id-{i}") for i, (role, text) in enumerate(history)]


def random_text(rng: random.Random) -> str:
    # Mostly short texts, some far over a budget, a few empty.
    size = rng.choice([0, rng.randint(1, 8), rng.randint(1, 8), rng.randint(20, 80)])
    return " ".join(f"w{rng.randint(0, 999)}" for _ in range(size))


def check_the_rule(history: list, budget: int, tokenizer, exact: bool) -> None:
    window = history_window(history, budget, tokenizer, AI)
    if budget <= 0 or not history:
        assert window == []
        return
    texts = [str(m.content) for m in window]
    # Within the budget; starts on a human turn and alternates, so it ends on the AI turn
    # before the new human message.
    assert sum(tokenizer.count_tokens(t) for t in texts) <= budget
    assert [isinstance(m, HumanMessage) for m in window] == [i % 2 == 0 for i in range(len(window))]
    # The newest turns that fit whole are all there, whole.
    whole, used = 0, 0
    while whole < len(history) and used + words(history[-1 - whole]["text"]) <= budget:
        used += words(history[-1 - whole]["text"])
        whole += 1
    if whole:
        assert window[-whole:] == to_messages(history[-whole:], AI)
    rest = window[: len(window) - whole]
    if whole == 0:  # not even the newest fits: its end, as much of it as the budget holds
        if not exact and not window:
            return  # nothing of it fits once cut
        newest, cut = history[-1]["text"], texts[-1]
        assert newest.endswith(cut.removeprefix("~")) and cut
        if exact:
            assert tokenizer.count_tokens(cut) == budget
        used, rest = tokenizer.count_tokens(cut), rest[:-1]
    # Then, only where the window would start on an AI turn, one human turn: the end of the
    # one before it (empty when none is left, or no budget).
    first_kept = history[len(history) - max(whole, 1)]
    assert len(rest) == (first_kept["role"] == AI)
    if rest:
        opener = str(rest[0].content)
        before = history[-max(whole, 1) - 1]["text"] if len(history) > max(whole, 1) else ""
        assert before.endswith(opener.removeprefix("~"))
        if exact and before:
            assert tokenizer.count_tokens(opener) == budget - used


@pytest.mark.parametrize("seed", range(20))
def test_history_window_follows_the_rule_on_random_histories(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(100):
        history = random_history(rng)
        budget = rng.choice([rng.randint(-1, 10), rng.randint(0, 100), 300])
        check_the_rule(history, budget, WORDS, exact=True)
        check_the_rule(history, budget, Retokenizing(), exact=False)


def test_history_window_counts_each_turn_at_most_once() -> None:
    history = [make_turn("human" if i % 2 == 0 else AI, "a b", i, None) for i in range(200)]
    counted: list[str] = []

    class Counting:
        def count_tokens(self, text: str) -> int:
            counted.append(text)
            return words(text)

        def last_tokens(self, text: str, count: int) -> str:
            return WORDS.last_tokens(text, count)

    window = history_window(history, 10, Counting(), AI)
    # 5 turns of 2 tokens fit; the oldest of them is an AI turn: an empty human turn opens it
    assert len(window) == 6 and window[0] == HumanMessage("")
    assert len(counted) == 6  # the five that fit and the one that did not
