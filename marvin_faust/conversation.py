"""Conversation logic as pure functions: no Faust, no Kafka, no model.

A conversation's history is a list of :class:`Turn` dicts, oldest first: plain JSON, so it is
the table value as stored in RocksDB and on the changelog topic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypedDict

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage


class Tokenizer(Protocol):
    """What the history window needs of the model's tokenizer; every ``ChatBackend`` has it."""

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text``."""
        ...

    def last_tokens(self, text: str, count: int) -> str:
        """The text of the last ``count`` tokens of ``text`` (all of it when it has fewer)."""
        ...


class Turn(TypedDict):
    role: str
    text: str
    timestamp: int  # ns since the epoch, as on the wire
    message_id: str | None


def make_turn(role: str, text: str, timestamp: int, message_id: str | None) -> Turn:
    return Turn(role=role, text=text, timestamp=timestamp, message_id=message_id)


def append_turns(history: Sequence[Turn], new_turns: Sequence[Turn], max_turns: int) -> list[Turn]:
    """A new list: ``history`` + ``new_turns``, the oldest dropped beyond ``max_turns``.

    Always a new list: a Faust table only writes its changelog on assignment.
    """
    combined = [*history, *new_turns]
    return combined[-max_turns:]


def has_message(history: Sequence[Turn], message_id: str | None) -> bool:
    return message_id is not None and any(turn["message_id"] == message_id for turn in history)


def to_messages(history: Sequence[Turn], ai_role: str) -> list[BaseMessage]:
    return [
        AIMessage(turn["text"]) if turn["role"] == ai_role else HumanMessage(turn["text"])
        for turn in history
    ]


def history_window(
    history: Sequence[Turn], token_budget: int, tokenizer: Tokenizer, ai_role: str
) -> list[BaseMessage]:
    """The end of ``history`` that fits in ``token_budget`` tokens, as the prompt's messages.

    The rule:

    1. Walk back from the newest turn, keeping each turn whole while the total fits.
    2. If not even the newest turn fits, keep its end: its last tokens, as many as the budget,
       cut at a token boundary (``tokenizer.last_tokens``).
    3. The window starts on a human turn, as chat templates require (Llama-2's and Gemma's
       raise on an assistant turn first). When it would start on an AI turn, the human turn
       before it opens the window, cut to its end in what is left of the budget: often
       nothing, then an empty human turn. An empty human turn also opens a window that starts
       with the greeting, the bot's opening line stored as a conversation's first (AI) turn,
       so the model sees what it said first.

    The seed system's LangChain ``ConversationTokenBufferMemory`` drops the oldest messages one
    at a time, so it too keeps the newest turns whole. This window used to be LangChain's
    ``trim_messages`` (last, start on human, no partial message): with replies of up to
    ``MARVIN_MAX_TOKENS`` = 250 tokens against the 300-token budget, the newest exchange was
    often over the budget, its AI turn could not start the window, and the model saw no history
    at all. The stored history alternates (human, AI) after an optional greeting, so the window
    alternates too, and ends on the AI turn before the new human message.

    Walking back from the newest turn counts each text once and builds messages for the window
    only: on a 200-turn history, ``trim_messages`` (one message per stored turn, prefixes
    recounted in its binary search) was most of the agent's own time in the profile.
    """
    if token_budget <= 0 or not history:
        return []
    start, used = len(history), 0
    while start > 0:
        tokens = tokenizer.count_tokens(history[start - 1]["text"])
        if used + tokens > token_budget:
            break
        used += tokens
        start -= 1
    window = to_messages(history[start:], ai_role)
    if not window:  # not even the newest turn fits: keep its end
        start -= 1
        newest = history[start]
        end = end_within(newest["text"], token_budget, tokenizer)
        if not end:  # a budget of a token or two can be too small even for that
            return []
        window = [AIMessage(end) if newest["role"] == ai_role else HumanMessage(end)]
        used = tokenizer.count_tokens(end)
    if isinstance(window[0], AIMessage):
        before = history[start - 1] if start > 0 else None
        opener = ""
        if before is not None and before["role"] != ai_role:
            opener = end_within(before["text"], token_budget - used, tokenizer)
        window.insert(0, HumanMessage(opener))
    return window


def end_within(text: str, room: int, tokenizer: Tokenizer) -> str:
    """The end of ``text`` in at most ``room`` tokens, cut at a token boundary.

    Text cut from a longer one can tokenize to a few more tokens than it was cut to (its first
    word loses its context): then it is cut again, shorter by the excess.
    """
    keep = room
    while keep > 0:
        end = tokenizer.last_tokens(text, keep)
        over = tokenizer.count_tokens(end) - room
        if over <= 0:
            return end
        keep -= over
    return ""


def build_prompt(persona: str, window: Sequence[BaseMessage], text: str) -> list[BaseMessage]:
    """Persona system message, the history window, then the new human message."""
    return [SystemMessage(persona), *window, HumanMessage(text)]
