"""Conversation logic as pure functions: no Faust, no Kafka, no model.

A conversation's history is a list of :class:`Turn` dicts, oldest first: plain JSON, so it is
the table value as stored in RocksDB and on the changelog topic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypedDict

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

TokenCounter = Callable[[str], int]


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
    history: Sequence[Turn], token_budget: int, count_tokens: TokenCounter, ai_role: str
) -> list[BaseMessage]:
    """The newest turns whose texts fit in ``token_budget`` tokens, starting on a human turn.

    Starting on a human turn keeps user/assistant alternation, which chat templates require.

    The result is exactly ``trim_messages(to_messages(history), max_tokens=token_budget,
    strategy="last", start_on="human", allow_partial=False)`` with a counter summing the
    texts' tokens (tests/unit/test_conversation.py checks it against LangChain). It is
    computed on the turns themselves: walking back from the newest turn counts each text once
    and builds messages for the window only, where trim_messages builds one per stored turn
    and recounts whole prefixes in its binary search; on a 200-turn history that was most of
    the agent's own time in the profile (``make bench``).
    """
    if token_budget <= 0 or not history:
        return []
    start, used = len(history), 0
    while start > 0:
        used += count_tokens(history[start - 1]["text"])
        if used > token_budget:
            break
        start -= 1
    while start < len(history) and history[start]["role"] == ai_role:
        start += 1
    return to_messages(history[start:], ai_role)


def build_prompt(persona: str, window: Sequence[BaseMessage], text: str) -> list[BaseMessage]:
    """Persona system message, the history window, then the new human message."""
    return [SystemMessage(persona), *window, HumanMessage(text)]
