"""``marvin_faust.dead_letters``: the dead letter, its reduced form, and which errors say a
record is too large."""

from __future__ import annotations

from aiokafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
from faust.exceptions import ProducerSendError

from marvin_faust.dead_letters import (
    OMITTED_HEADER,
    REASON_HEADER,
    REDUCED_FIELD_BYTES,
    SOURCE_HEADER,
    cut_utf8,
    dead_letter,
    record_size,
    reduced_dead_letter,
    too_large,
)


def test_a_dead_letter_is_the_record_with_its_reason_and_source():
    headers = [("uuid", b"m-1"), (REASON_HEADER, b"an older reason")]
    letter = dead_letter(b"cid", b"{bad", headers, "bad message: not JSON", "chat/1@7")
    assert (letter.key, letter.value) == (b"cid", b"{bad")
    assert letter.headers == [
        ("uuid", b"m-1"),
        (REASON_HEADER, b"bad message: not JSON"),
        (SOURCE_HEADER, b"chat/1@7"),
    ]


def test_a_reduced_dead_letter_refers_to_the_value_and_keeps_only_small_fields():
    value = b"x" * 1_000_000
    headers = [("uuid", b"m-1"), ("trace", b"t" * 5000)]
    reason = "bad message: " + "\u00e9" * 2000  # 2 bytes a character
    letter = reduced_dead_letter(b"cid", value, headers, reason, "chat/1@7")
    assert letter.key == b"cid"
    assert letter.value == b"chat/1@7"  # where the original can still be read
    found = dict(letter.headers)
    assert found["uuid"] == b"m-1"  # the message id stays: tools match dead letters by it
    assert "trace" not in found
    assert found[SOURCE_HEADER] == b"chat/1@7"
    assert len(found[REASON_HEADER]) <= REDUCED_FIELD_BYTES
    assert found[REASON_HEADER].decode().startswith("bad message: \u00e9")
    assert found[REASON_HEADER].endswith(b"...")
    assert found[OMITTED_HEADER] == b"value (1000000 bytes), header 'trace' (5000 bytes)"
    assert sum(len(k) + len(v) for k, v in letter.headers) < 4 * REDUCED_FIELD_BYTES


def test_a_reduced_dead_letter_drops_a_long_key():
    letter = reduced_dead_letter(b"k" * 2000, None, [], "why", "chat/0@1")
    assert letter.key is None
    assert dict(letter.headers)[OMITTED_HEADER] == b"value (0 bytes), key (2000 bytes)"


def test_cut_utf8_cuts_at_a_character():
    assert cut_utf8("short", 10) == b"short"
    cut = cut_utf8("\u00e9" * 10, 10)  # 20 bytes
    assert cut == "\u00e9\u00e9\u00e9".encode() + b"..."  # 3 characters (6 bytes) fit before "..."


def test_too_large_sees_the_size_errors_through_fausts_wrapping():
    try:
        try:
            raise MessageSizeTooLargeError("over max_request_size")
        except MessageSizeTooLargeError as exc:
            raise ProducerSendError(f"Error while sending: {exc!r}") from exc
    except ProducerSendError as wrapped:
        assert too_large(wrapped)
    assert too_large(MessageSizeTooLargeError())  # the broker's refusal, on the delivery
    assert not too_large(KafkaTimeoutError())
    assert not too_large(ProducerSendError("No transaction producer found"))


def test_record_size_bounds_the_batch_of_one_record():
    letter = dead_letter(b"cid", b"v" * 1000, [("uuid", b"m-1")], "why", "chat/1@7")
    fields = 3 + 1000 + sum(len(k) + len(v) for k, v in letter.headers)
    assert fields + 61 <= record_size(letter) <= fields + 61 + 100  # batch header, lengths
