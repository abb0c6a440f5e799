"""The domain's errors; each knows its canonical status code and an ErrorInfo reason.

MailsvcError
 ├── InvalidArgument        INVALID_ARGUMENT (carries field violations)
 ├── Unauthenticated        UNAUTHENTICATED
 ├── PermissionDenied       PERMISSION_DENIED
 ├── NotFound               NOT_FOUND
 ├── Aborted                ABORTED
 ├── FailedPrecondition     FAILED_PRECONDITION
 ├── Unavailable            UNAVAILABLE
 ├── ResourceExhausted      RESOURCE_EXHAUSTED
 └── DeadlineExceeded       DEADLINE_EXCEEDED

Transports raise these with `transient` telling whether a retry may help. Messages are shown
to clients: plain words, never a secret or a third party's text.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, named by its path in the request."""

    field: str
    description: str


class MailsvcError(Exception):
    """Base of every error a client may see."""

    code = "INTERNAL"
    default_reason = "INTERNAL"
    transient = False

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason


class InvalidArgument(MailsvcError):
    code = "INVALID_ARGUMENT"
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation], *, message: str | None = None) -> None:
        if message is None:
            message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(message)
        self.violations = violations

    @classmethod
    def one(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])


class Unauthenticated(MailsvcError):
    code = "UNAUTHENTICATED"
    default_reason = "TOKEN_INVALID"


class PermissionDenied(MailsvcError):
    code = "PERMISSION_DENIED"
    default_reason = "ROLE_MISSING"


class NotFound(MailsvcError):
    code = "NOT_FOUND"
    default_reason = "NOT_FOUND"


class Aborted(MailsvcError):
    code = "ABORTED"
    default_reason = "ETAG_MISMATCH"


class FailedPrecondition(MailsvcError):
    code = "FAILED_PRECONDITION"
    default_reason = "FAILED_PRECONDITION"


class Unavailable(MailsvcError):
    code = "UNAVAILABLE"
    default_reason = "UNAVAILABLE"
    transient = True


class ResourceExhausted(MailsvcError):
    code = "RESOURCE_EXHAUSTED"
    default_reason = "RESOURCE_EXHAUSTED"


class RateLimited(ResourceExhausted):
    """The provider asked us to slow down; a later retry may succeed."""

    transient = True


class DeadlineExceeded(MailsvcError):
    code = "DEADLINE_EXCEEDED"
    default_reason = "DEADLINE_EXCEEDED"
