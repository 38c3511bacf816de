import json

import pytest

from marvin_faust.models import (
    BadMessage,
    header_pairs,
    header_value,
    make_message,
    parse_chat_message,
)

WIRE = {
    "uuid": "c-1",
    "role": "human",
    "text": "Hello",
    "conversation_id": "c-1",
    "Timestamp": 1700000000000000000,
}


def raw(**changes) -> bytes:
    document = {**WIRE, **changes}
    return json.dumps({k: v for k, v in document.items() if v is not ...}).encode()


def test_parses_the_wire_format_and_tolerates_extra_fields():
    message = parse_chat_message(raw(extra="ignored", nested={"a": 1}), max_text_chars=100)
    assert message.asdict() == WIRE


def test_serialises_back_to_the_wire_format_with_capital_t():
    message = make_message("c-2", "AI", "No.")
    document = json.loads(message.to_bytes())
    assert set(document) == {"uuid", "role", "text", "conversation_id", "Timestamp"}
    assert document["uuid"] == document["conversation_id"] == "c-2"
    assert isinstance(document["Timestamp"], int) and document["Timestamp"] > 1.7e18


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "null value"),
        (b"\xff\xfe{", "not UTF-8"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON list, expected an object"),
        (raw(text=...), "missing field 'text'"),
        (raw(Timestamp=...), "missing field 'Timestamp'"),
        (raw(Timestamp="1700"), "field 'Timestamp' must be int, got str"),
        (raw(Timestamp=True), "field 'Timestamp' must be int, got bool"),
        (raw(Timestamp=1.5), "field 'Timestamp' must be int, got float"),
        (raw(role=None), "field 'role' must be str, got NoneType"),
        (raw(text="   "), "empty text"),
        (raw(text="x" * 101), "text has 101 characters, the limit is 100"),
        (raw(conversation_id=""), "empty conversation_id"),
    ],
)
def test_bad_values_raise_with_the_reason(value, reason):
    with pytest.raises(BadMessage, match=reason.replace("(", r"\(").replace("[", r"\[")):
        parse_chat_message(value, max_text_chars=100)


def test_header_value_reads_lists_and_dicts():
    assert header_value([("a", b"1"), ("uuid", b"m-1")], "uuid") == "m-1"
    assert header_value({"uuid": b"m-2"}, "uuid") == "m-2"
    assert header_value([("uuid", b"\xff")], "uuid") is None
    assert header_value(None, "uuid") is None


def test_header_pairs_reads_lists_and_dicts():
    assert header_pairs([("a", b"1"), ("a", b"2")]) == [("a", b"1"), ("a", b"2")]
    assert header_pairs({"uuid": b"m-2"}) == [("uuid", b"m-2")]
    assert header_pairs(None) == []
