"""Dead-letter records as pure functions: what goes to the dead-letter topic, and its reduced
form for a record the broker will not take (no Faust, no Kafka).

A dead letter is the original record (key, value, headers) plus two headers: why, and where it
came from (``topic/partition@offset``). A record near the broker's size limit can go over it
once those headers are added: then it is sent reduced, with the value replaced by the reference
to the original, which stays readable on the chat topic for its retention time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder

# Why, and where the record came from.
REASON_HEADER = "dead-letter-reason"
SOURCE_HEADER = "dead-letter-source"
# In a reduced dead letter: what was left out.
OMITTED_HEADER = "dead-letter-omitted"

# In a reduced dead letter, the longest key, header and reason kept.
REDUCED_FIELD_BYTES = 1024
# The headers a dead letter gets: any the record already had are replaced.
OWN_HEADERS = (REASON_HEADER, SOURCE_HEADER, OMITTED_HEADER)

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class DeadLetter:
    key: bytes | None
    value: bytes | None
    headers: Headers


def dead_letter(
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    reason: str,
    source: str,
) -> DeadLetter:
    """The original record with the reason and source headers (replacing any it had)."""
    kept = [(k, v) for k, v in headers if k not in OWN_HEADERS]
    return DeadLetter(
        key, value, [*kept, (REASON_HEADER, reason.encode()), (SOURCE_HEADER, source.encode())]
    )


def reduced_dead_letter(
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    reason: str,
    source: str,
) -> DeadLetter:
    """A dead letter small whatever the record: the value replaced by ``source`` (where the
    original can be read), the key and each header kept only up to
    :data:`REDUCED_FIELD_BYTES` (so a ``uuid`` header stays), the reason cut to that length,
    and an ``OMITTED_HEADER`` saying what was left out."""
    omitted = [f"value ({len(value or b'')} bytes)"]
    if key is not None and len(key) > REDUCED_FIELD_BYTES:
        omitted.append(f"key ({len(key)} bytes)")
        key = None
    kept: Headers = []
    for name, data in headers:
        if name in OWN_HEADERS:
            continue
        if len(name.encode()) + len(data or b"") > REDUCED_FIELD_BYTES:
            omitted.append(f"header {name[:64]!r} ({len(data or b'')} bytes)")
        else:
            kept.append((name, data))
    return DeadLetter(
        key,
        source.encode(),
        [
            *kept,
            (REASON_HEADER, cut_utf8(reason, REDUCED_FIELD_BYTES)),
            (SOURCE_HEADER, source.encode()),
            (OMITTED_HEADER, ", ".join(omitted).encode()),
        ],
    )


def record_size(letter: DeadLetter) -> int:
    """An upper bound of the record batch ``letter`` makes alone: what the producer's
    ``max_request_size`` and the topic's ``max.message.bytes`` are compared with."""
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(
        letter.key, letter.value, list(letter.headers)
    )


def cut_utf8(text: str, limit: int) -> bytes:
    """``text`` as UTF-8 in at most ``limit`` bytes, cut at a character, "..." where cut."""
    data = text.encode()
    if len(data) <= limit:
        return data
    return data[: limit - 3].decode("utf-8", errors="ignore").encode() + b"..."


def too_large(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it: Faust wraps aiokafka's errors) says the record is
    over a size limit: the producer's ``max_request_size`` or the broker's or topic's."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, MessageSizeTooLargeError | RecordListTooLargeError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
