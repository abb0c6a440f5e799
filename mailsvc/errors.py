"""The domain's errors; each knows its canonical status code and an ErrorInfo reason.

MailsvcError
 ├── InvalidArgument        INVALID_ARGUMENT (carries field violations)
 ├── Unauthenticated        UNAUTHENTICATED
 ├── PermissionDenied       PERMISSION_DENIED
 ├── NotFound               NOT_FOUND
 ├── Aborted                ABORTED
 ├── FailedPrecondition     FAILED_PRECONDITION
 ├── Unavailable            UNAVAILABLE              transient
 ├── DeliveryUncertain      UNAVAILABLE (reason DELIVERY_UNCERTAIN): never retried, never
 │                          failed over; not an Unavailable, so no isinstance check retries it
 ├── ResourceExhausted      RESOURCE_EXHAUSTED
 │    └── RateLimited       RESOURCE_EXHAUSTED       transient
 └── DeadlineExceeded       DEADLINE_EXCEEDED

Whether a retry may help is part of each class (`transient`), never changed on an instance.
The rule for delivery: a retry (or a failover to the next transport) happens only for a
transient error, which transports raise only when the mail surely did not reach the provider
or the provider refused it for now. When the provider may have taken the mail (the connection
was lost during SMTP DATA, a Mailgun reply was lost or unreadable), the transport raises
DeliveryUncertain: never resend what may have been delivered. The queue marks such a message
FAILED with reason DELIVERY_UNCERTAIN.

Messages are shown to clients: plain words, never a secret or a third party's text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, named by its path in the request."""

    field: str
    description: str


class MailsvcError(Exception):
    """Base of every error a client may see."""

    code = "INTERNAL"
    default_reason = "INTERNAL"
    transient: ClassVar[bool] = False  # whether a retry may help; fixed per class
    transport = ""  # the transport that failed, when a send failed (set by the mailer)

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
    """The provider could not take the mail for now; nothing was handed over."""

    code = "UNAVAILABLE"
    default_reason = "UNAVAILABLE"
    transient = True


class DeliveryUncertain(MailsvcError):
    """The provider may have taken the mail: it is never sent again, nor elsewhere."""

    code = "UNAVAILABLE"
    default_reason = "DELIVERY_UNCERTAIN"


class ResourceExhausted(MailsvcError):
    code = "RESOURCE_EXHAUSTED"
    default_reason = "RESOURCE_EXHAUSTED"


class RateLimited(ResourceExhausted):
    """The provider asked us to slow down; a later retry may succeed."""

    transient = True


class DeadlineExceeded(MailsvcError):
    code = "DEADLINE_EXCEEDED"
    default_reason = "DEADLINE_EXCEEDED"
