"""Proto <-> domain conversions of the message and suppression RPCs (no logic besides)."""

from __future__ import annotations

from typing import cast

from google.protobuf.timestamp_pb2 import Timestamp

from mailsvc.errors import InvalidArgument
from mailsvc.sending import Accepted
from mailsvc.storage.base import Event, MessageRecord, Status, Suppression
from mailsvc.v1 import mail_pb2 as pb
from mailsvc.v1 import suppression_pb2 as spb


def status(value: Status) -> pb.MessageStatus:
    return cast("pb.MessageStatus", int(value))


NANOS = 1_000_000_000


def set_time(stamp: Timestamp, seconds: float) -> None:
    """`stamp` set in place (as Timestamp.FromNanoseconds does, without its call overhead)."""
    stamp.seconds, stamp.nanos = divmod(int(seconds * 1e9), NANOS)


def timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    set_time(stamp, seconds)
    return stamp


# google.protobuf.Timestamp's own range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z
MIN_TIMESTAMP_SECONDS = -62135596800
MAX_TIMESTAMP_SECONDS = 253402300799


def seconds(stamp: Timestamp, field: str = "send_at") -> float:
    """The time a client sent; one outside what a Timestamp may hold is INVALID_ARGUMENT."""
    if not (
        MIN_TIMESTAMP_SECONDS <= stamp.seconds <= MAX_TIMESTAMP_SECONDS
        and 0 <= stamp.nanos <= 999_999_999
    ):
        raise InvalidArgument.one(field, "not a valid timestamp")
    return stamp.ToNanoseconds() / 1e9


def response(accepted: Accepted) -> pb.SendMailResponse:
    out = pb.SendMailResponse(
        id=accepted.id, status=status(accepted.status), suppressed=accepted.suppressed
    )
    delivery = accepted.delivery
    if delivery is not None:
        out.message_id = delivery.message_id
        out.transport = delivery.transport
        out.recipients.extend(delivery.recipients)
    return out


def event(e: Event) -> pb.MessageEvent:
    return pb.MessageEvent(
        message_id=e.message_id, time=timestamp(e.time), status=status(e.status), detail=e.detail
    )


def message(record: MessageRecord) -> pb.Message:
    # A page of ListMessages converts 50 of these: fields set in place, empty ones skipped
    # (8.5 -> 3.5 us per record).
    out = pb.Message(
        id=record.id, status=status(record.status), caller=record.caller, attempts=record.attempts
    )
    if record.to:
        out.to.extend(record.to)
    if record.cc:
        out.cc.extend(record.cc)
    if record.bcc:
        out.bcc.extend(record.bcc)
    if record.subject:
        out.subject = record.subject
    if record.template_name:
        out.template_name = record.template_name
    if record.transport:
        out.transport = record.transport
    if record.message_id:
        out.message_id = record.message_id
    if record.last_error:
        out.last_error = record.last_error
    if record.last_error_reason:
        out.last_error_reason = record.last_error_reason
    if record.suppressed:
        out.suppressed.extend(record.suppressed)
    set_time(out.create_time, record.create_time)
    set_time(out.send_time, record.send_time)
    set_time(out.update_time, record.update_time)
    if record.next_attempt_time is not None:
        set_time(out.next_attempt_time, record.next_attempt_time)
    if record.events:
        out.events.extend(event(e) for e in record.events)
    return out


def suppression(entry: Suppression) -> spb.Suppression:
    return spb.Suppression(
        address=entry.address,
        reason=entry.reason,  # type: ignore[arg-type]
        create_time=timestamp(entry.create_time),
        detail=entry.detail,
    )
