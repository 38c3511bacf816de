import json
import uuid

import pytest

from marvin_faust.models import (
    CONVERSATION_ID_MAX_CHARS,
    BadMessage,
    conversation_id_problem,
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
        (raw(conversation_id="a b"), "conversation_id 'a b' may only hold ASCII letters"),
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


@pytest.mark.parametrize(
    "conversation_id",
    [
        str(uuid.uuid4()),  # what the front ends make
        str(uuid.uuid4()).upper(),
        uuid.uuid4().hex,
        "c-1",
        "user_42.session-7",
        "a..b",
        "x" * CONVERSATION_ID_MAX_CHARS,
    ],
)
def test_valid_conversation_ids(conversation_id):
    assert conversation_id_problem(conversation_id) is None


@pytest.mark.parametrize(
    ("conversation_id", "reason"),
    [
        ("", "empty conversation_id"),
        ("x" * (CONVERSATION_ID_MAX_CHARS + 1), "conversation_id has 129 characters, the limit"),
        ("x%3Flimit=1", "may only hold"),  # would be decoded into a query on the worker
        ("x?limit=1", "may only hold"),
        ("../health", "may only hold"),
        ("..", "may only hold"),
        (".", "may only hold"),
        (".hidden", "may only hold"),
        ("a/b", "may only hold"),
        ("a#b", "may only hold"),
        ("a b", "may only hold"),
        ("a\nb", "may only hold"),
        ("caf\u00e9", "may only hold"),
        ("a:b", "may only hold"),
    ],
)
def test_invalid_conversation_ids_say_why(conversation_id, reason):
    problem = conversation_id_problem(conversation_id)
    assert problem is not None and reason in problem
    assert "\n" not in problem  # one line, whatever the id holds


def test_a_forget_record_keeps_the_chat_records_shape_with_its_own_role():
    from marvin_faust.models import (
        CONTROL_HEADER,
        ForgetReason,
        make_forget,
        parse_forget,
    )

    forget = make_forget("c-1")
    document = json.loads(forget.to_bytes())
    assert document["role"] == "control" and document["conversation_id"] == "c-1"
    assert document["reason"] == "request" and "idle_since" not in document
    # a chat record still: old readers that keep role AI or human pass over it
    assert parse_chat_message(forget.to_bytes(), max_text_chars=100).role == "control"
    assert dict(forget.headers("m-1")) == {CONTROL_HEADER: b"forget", "uuid": b"m-1"}
    assert parse_forget(forget.to_bytes()) == forget
    expiry = make_forget("c-1", ForgetReason.EXPIRED, idle_since=42)
    assert parse_forget(expiry.to_bytes()).idle_since == 42


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\xff", "not UTF-8 JSON"),
        (b"[]", "not a JSON object"),
        (b'{"Timestamp": 1, "reason": "request"}', "conversation_id must be a string"),
        (b'{"conversation_id": "a/b", "Timestamp": 1, "reason": "request"}', "may only hold"),
        (b'{"conversation_id": "c", "reason": "request"}', "Timestamp must be int"),
        (b'{"conversation_id": "c", "Timestamp": 1, "reason": "bored"}', "unknown reason"),
        (b'{"conversation_id": "c", "Timestamp": 1, "reason": "expired"}', "needs idle_since"),
    ],
)
def test_a_bad_forget_record_says_why(value, reason):
    from marvin_faust.models import parse_forget

    with pytest.raises(BadMessage, match=reason):
        parse_forget(value)
