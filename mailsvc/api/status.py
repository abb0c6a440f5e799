"""The one place where our errors become google.rpc.Status (code, message, details).

The status travels in the trailers, which clients cap (8 KB soft, 16 KB hard by default), so
what a request echoes back is bounded here: long texts are shortened in the middle, and only
the first violations are listed, with one more saying how many were left out.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from mailsvc.errors import FieldViolation, InvalidArgument, MailsvcError, Unavailable
from mailsvc.limits import QuotaExceeded
from mailsvc.storage.base import StorageError
from mailsvc.watch import FellBehind

DOMAIN = "mailsvc"
MAX_FIELD_CHARS = 100
MAX_DESCRIPTION_CHARS = 160
MAX_MESSAGE_CHARS = 300
MAX_VIOLATIONS = 20
MAX_VIOLATION_BYTES = 3000  # fields and descriptions together, UTF-8


def shorten(text: str, limit: int) -> str:
    """`text`, or its start and end around an ellipsis: the end often says what was wrong."""
    if len(text) <= limit:
        return text
    tail = limit // 3
    return f"{text[: limit - tail - 1]}…{text[-tail:]}"


def shown_violations(violations: list[FieldViolation]) -> list[FieldViolation]:
    """The violations to send: the first ones that fit, then one naming how many are left."""
    shown: list[FieldViolation] = []
    size = 0
    for v in violations:
        if len(shown) == MAX_VIOLATIONS:
            break
        short = FieldViolation(
            shorten(v.field, MAX_FIELD_CHARS), shorten(v.description, MAX_DESCRIPTION_CHARS)
        )
        size += len(short.field.encode()) + len(short.description.encode())
        if size > MAX_VIOLATION_BYTES and shown:
            break
        shown.append(short)
    left = len(violations) - len(shown)
    if left:
        field = shorten(violations[len(shown)].field, MAX_FIELD_CHARS)
        shown.append(FieldViolation(field, f"{left} more violations from here on are not listed"))
    return shown


def domain_error(exc: BaseException) -> MailsvcError | None:
    """Our error for `exc`: itself, or what a lower layer's failure means to a client; None
    for anything else (a bug: INTERNAL)."""
    if isinstance(exc, MailsvcError):
        return exc
    if isinstance(exc, FellBehind):
        return Unavailable(
            "the watch fell too far behind the changes; watch again", reason="WATCH_FELL_BEHIND"
        )
    if isinstance(exc, StorageError):
        # The store's own words may name files or hosts: they go to the log, not the client.
        return Unavailable(
            "the message store is unavailable; try again later", reason="STORAGE_UNAVAILABLE"
        )
    return None


def to_status(exc: MailsvcError) -> grpc.Status:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN))
    details = [info]
    message = exc.message
    if isinstance(exc, InvalidArgument):
        violations = shown_violations(exc.violations)
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
        if len(message) > MAX_MESSAGE_CHARS:
            message = "; ".join(f"{v.field}: {v.description}" for v in violations)
    elif isinstance(exc, QuotaExceeded):
        details.extend(_quota_details(exc))
    status = status_pb2.Status(
        code=code_pb2.Code.Value(exc.code),
        message=shorten(message, MAX_MESSAGE_CHARS),
        details=details,
    )
    return rpc_status.to_status(status)


def _quota_details(exc: QuotaExceeded) -> list[any_pb2.Any]:
    """QuotaFailure always; RetryInfo only when a retry would be accepted (AIP-193)."""
    failure = any_pb2.Any()
    failure.Pack(
        error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(
                    subject=exc.quota_subject, description=exc.quota_description
                )
            ]
        )
    )
    if exc.retry_after is None:
        return [failure]
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(max(exc.retry_after, 0.0) * 1e9))
    retry = any_pb2.Any()
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return [failure, retry]


def internal_status() -> grpc.Status:
    return to_status(MailsvcError("internal error; the server log has the details"))
