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


def timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
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
    out = pb.Message(
        id=record.id,
        status=status(record.status),
        caller=record.caller,
        to=record.to,
        cc=record.cc,
        bcc=record.bcc,
        subject=record.subject,
        template_name=record.template_name,
        transport=record.transport,
        message_id=record.message_id,
        create_time=timestamp(record.create_time),
        send_time=timestamp(record.send_time),
        update_time=timestamp(record.update_time),
        attempts=record.attempts,
        last_error=record.last_error,
        last_error_reason=record.last_error_reason,
        events=[event(e) for e in record.events],
        suppressed=record.suppressed,
    )
    if record.next_attempt_time is not None:
        out.next_attempt_time.CopyFrom(timestamp(record.next_attempt_time))
    return out


def suppression(entry: Suppression) -> spb.Suppression:
    return spb.Suppression(
        address=entry.address,
        reason=entry.reason,  # type: ignore[arg-type]
        create_time=timestamp(entry.create_time),
        detail=entry.detail,
    )
