"""mailsvc.errors: every domain error names a real gRPC status code and an UPPER_SNAKE reason."""

from __future__ import annotations

import re

import grpc
import pytest

from mailsvc import errors
from mailsvc.errors import FieldViolation, InvalidArgument, MailsvcError


def every_error_class() -> list[type[MailsvcError]]:
    found: list[type[MailsvcError]] = []
    todo: list[type[MailsvcError]] = [MailsvcError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("cls", every_error_class(), ids=lambda cls: cls.__name__)
def test_code_is_a_grpc_status_and_reason_is_upper_snake(cls: type[MailsvcError]) -> None:
    assert cls.code in grpc.StatusCode.__members__
    assert cls.code != "OK"
    assert re.fullmatch(r"[A-Z][A-Z0-9_]*", cls.default_reason), cls.default_reason


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (errors.InvalidArgument, "INVALID_ARGUMENT"),
        (errors.Unauthenticated, "UNAUTHENTICATED"),
        (errors.PermissionDenied, "PERMISSION_DENIED"),
        (errors.NotFound, "NOT_FOUND"),
        (errors.Aborted, "ABORTED"),
        (errors.FailedPrecondition, "FAILED_PRECONDITION"),
        (errors.Unavailable, "UNAVAILABLE"),
        (errors.ResourceExhausted, "RESOURCE_EXHAUSTED"),
        (errors.RateLimited, "RESOURCE_EXHAUSTED"),
        (errors.DeadlineExceeded, "DEADLINE_EXCEEDED"),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else None,
)
def test_each_error_maps_to_its_status_code(cls: type[MailsvcError], code: str) -> None:
    assert cls.code == code


def test_reason_defaults_per_class_and_can_be_given() -> None:
    assert errors.PermissionDenied("no").reason == "ROLE_MISSING"
    assert errors.Aborted("stale").reason == "ETAG_MISMATCH"
    err = errors.FailedPrecondition("no transport configured", reason="NO_TRANSPORT")
    assert err.reason == "NO_TRANSPORT"
    assert err.message == str(err) == "no transport configured"


def test_invalid_argument_names_every_field() -> None:
    err = InvalidArgument(
        [FieldViolation("to[1]", "not an address"), FieldViolation("subject", "has a line break")]
    )
    assert [v.field for v in err.violations] == ["to[1]", "subject"]
    assert err.message == "to[1]: not an address; subject: has a line break"
    assert err.reason == "INVALID_ARGUMENT"


def test_invalid_argument_one() -> None:
    err = InvalidArgument.one("reply_to", "not an address")
    assert err.violations == [FieldViolation("reply_to", "not an address")]
