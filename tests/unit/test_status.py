"""Errors become small statuses: long values shortened, violations capped."""

from __future__ import annotations

from typing import Any

from google.rpc import error_details_pb2, status_pb2

from mailsvc.api import status as status_mod
from mailsvc.errors import FieldViolation, InvalidArgument, NotFound

# Clients refuse trailers over 8 KB (soft) / 16 KB (hard) by default.
TRAILER_BUDGET = 8 * 1024


def _size_and_violations(exc: InvalidArgument) -> tuple[int, list[tuple[str, str]]]:
    status = status_mod.to_status(exc)
    # On the wire: grpc-message percent-encodes non-ASCII bytes, -bin values are base64.
    message = status.details.encode()
    size = len(message) + 2 * sum(b > 0x7E for b in message)
    size += sum(len(k) + len(v) * 4 // 3 + 4 for k, v in status.trailing_metadata)
    proto = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    bad = error_details_pb2.BadRequest()
    proto.details[1].Unpack(bad)
    return size, [(v.field, v.description) for v in bad.field_violations]


def test_shorten_keeps_both_ends() -> None:
    assert status_mod.shorten("short", 10) == "short"
    text = "'" + "x" * 50_000 + "' is not a single valid email address"
    short = status_mod.shorten(text, 160)
    assert len(short) == 160
    assert short.startswith("'xxx") and short.endswith("' is not a single valid email address")
    assert "…" in short


def test_thousand_violations_are_capped() -> None:
    violations = [
        FieldViolation(f"to[{i}]", f"'bad{i}' is not a single valid email address")
        for i in range(1000)
    ]
    size, shown = _size_and_violations(InvalidArgument(violations))
    assert size < TRAILER_BUDGET
    assert shown[:20] == [(v.field, v.description) for v in violations[:20]]
    assert shown[20] == ("to[20]", "980 more violations from here on are not listed")
    assert len(shown) == 21


def test_one_huge_value_is_shortened() -> None:
    huge = "é" * 50_000  # non-ASCII: several bytes each, percent-encoded in grpc-message
    exc = InvalidArgument([FieldViolation("to[0]", f"{huge!r} is not a valid address")])
    size, shown = _size_and_violations(exc)
    assert size < TRAILER_BUDGET
    [(field, description)] = shown
    assert field == "to[0]"
    assert description.endswith(" is not a valid address")
    assert len(description) <= status_mod.MAX_DESCRIPTION_CHARS


def test_many_long_fields_stay_within_budget() -> None:
    violations = [
        FieldViolation("parameters." + "p" * 5000 + str(i), "é" * 5000) for i in range(50)
    ]
    size, shown = _size_and_violations(InvalidArgument(violations))
    assert size < TRAILER_BUDGET
    assert shown[-1][1].endswith("more violations from here on are not listed")


def test_small_errors_are_unchanged() -> None:
    exc = InvalidArgument.one("to", "at least one recipient is required")
    status = status_mod.to_status(exc)
    assert status.details == "to: at least one recipient is required"
    status = status_mod.to_status(NotFound("no template named 'x' " + "y" * 10_000))
    assert len(status.details) <= status_mod.MAX_MESSAGE_CHARS


def test_quota_errors_carry_quota_failure_and_retry_info() -> None:
    from google.rpc import error_details_pb2 as ed

    from mailsvc.limits import QuotaExceeded

    exc = QuotaExceeded(
        "over the limit",
        reason="RATE_LIMITED",
        retry_after=12.5,
        quota_subject="caller:alice",
        quota_description="10 mails per minute",
    )
    details = rpc_status_details(exc)
    failure = ed.QuotaFailure()
    assert details[1].Unpack(failure)
    assert failure.violations[0].subject == "caller:alice"
    retry = ed.RetryInfo()
    assert details[2].Unpack(retry)
    assert retry.retry_delay.seconds == 12 and retry.retry_delay.nanos == 500_000_000
    never = QuotaExceeded(
        "too big",
        reason="DAILY_QUOTA_EXCEEDED",
        retry_after=None,
        quota_subject="caller:alice",
        quota_description="100 mails per day",
    )
    assert len(rpc_status_details(never)) == 2  # no RetryInfo when no retry would fit


def rpc_status_details(exc: Exception) -> list[Any]:
    from google.rpc import status_pb2

    from mailsvc.api.status import to_status
    from mailsvc.errors import MailsvcError

    assert isinstance(exc, MailsvcError)
    status = to_status(exc)
    raw = dict(status.trailing_metadata)["grpc-status-details-bin"]
    return list(status_pb2.Status.FromString(raw).details)
