"""The rules of a message's life, as pure functions: when to send, retry or give up, who sees
it, and how a listing is paged. No I/O here; storage and gRPC live elsewhere."""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import random
import time
from dataclasses import dataclass

from mailsvc.auth import ADMIN, Principal
from mailsvc.errors import DeadlineExceeded, DeliveryUncertain, InvalidArgument, MailsvcError
from mailsvc.storage.base import Event, Finish, Status

MAX_SCHEDULE_AHEAD = 7 * 86400.0
SEND_NOW_WINDOW = 1.0  # a send_at this close (or in the past) is sent as soon as queued
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
JITTER = 0.2  # each retry delay is spread +-20%, so mails failed together do not retry together

DELIVERY_UNCERTAIN = "DELIVERY_UNCERTAIN"
QUEUE_MAX_AGE = "QUEUE_MAX_AGE_EXCEEDED"
# Failures the operator can fix in the settings: a queued mail waits for that, unlike a
# synchronous send that reports them at once.
SETTINGS_REASONS = frozenset(
    {
        "NO_TRANSPORT",
        "SMTP_AUTH_FAILED",
        "MAILGUN_AUTH_FAILED",
        "MAILGUN_DOMAIN_NOT_FOUND",
        "SMTP_TLS_FAILED",
        "STARTTLS_NOT_OFFERED",
        "SMTP_NOT_SUPPORTED",
        "AUTH_WITHOUT_TLS",
        "TOO_MANY_IN_FLIGHT",
    }
)


# --- scheduling


@dataclass(frozen=True)
class Plan:
    """How an accepted mail is stored: QUEUED (due now) or SCHEDULED (due at send_time)."""

    status: Status
    send_time: float


def plan(*, now: float, queue: bool, send_at: float | None, field: str = "send_at") -> Plan | None:
    """None for a synchronous send; else when the queued mail is due. `send_at` implies queue."""
    if send_at is None:
        return Plan(Status.QUEUED, now) if queue else None
    if send_at > now + MAX_SCHEDULE_AHEAD:
        raise InvalidArgument.one(field, "must be at most 7 days ahead")
    if send_at <= now + SEND_NOW_WINDOW:
        return Plan(Status.QUEUED, now)
    return Plan(Status.SCHEDULED, send_at)


# --- attempts


class Kind(enum.Enum):
    """What a failed attempt means for the message."""

    TRANSIENT = "transient"  # nothing was sent; try again later
    PERMANENT = "permanent"  # the provider refused the mail; trying again cannot help
    UNCERTAIN = "uncertain"  # it may have been handed over: never try again


def classify(error: MailsvcError) -> Kind:
    # An attempt cut by its time limit may have been mid-DATA: as unsure as a lost reply.
    if isinstance(error, DeliveryUncertain | DeadlineExceeded):
        return Kind.UNCERTAIN
    if error.transient or error.reason in SETTINGS_REASONS:
        return Kind.TRANSIENT
    return Kind.PERMANENT


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """--queue-retry-initial, --queue-retry-max and --queue-max-age, in seconds."""

    initial: float = 30.0
    maximum: float = 1800.0
    max_age: float = 86400.0


def retry_delay(attempt: int, policy: RetryPolicy, rng: random.Random | None = None) -> float:
    """The wait after failed attempt number `attempt` (1-based): doubling, jittered, capped."""
    exponent = min(max(attempt - 1, 0), 64)  # 2**64 * anything is past any cap
    base = min(policy.initial * 2.0**exponent, policy.maximum)
    spread = (rng or random).uniform(1 - JITTER, 1 + JITTER)
    return min(base * spread, policy.maximum)


def expired(now: float, send_time: float, policy: RetryPolicy) -> bool:
    """Not sent within the max age of its send time: no attempt may start any more."""
    return now > send_time + policy.max_age


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def sent(transport: str, message_id: str) -> Finish:
    return Finish(
        status=Status.SENT,
        transport=transport,
        message_id=message_id,
        detail=f"handed over to {transport}",
    )


def _expired_detail(send_time: float, policy: RetryPolicy) -> str:
    return f"not sent within {policy.max_age:g} s of its send time ({_when(send_time)})"


def gave_up_expired(send_time: float, policy: RetryPolicy) -> Finish:
    detail = _expired_detail(send_time, policy)
    return Finish(status=Status.FAILED, error=detail, reason=QUEUE_MAX_AGE, detail=detail)


def after_failure(
    error: MailsvcError,
    *,
    now: float,
    send_time: float,
    attempt: int,
    policy: RetryPolicy,
    rng: random.Random | None = None,
) -> Finish:
    """The outcome of failed attempt number `attempt`: rescheduled, or FAILED and why."""
    kind = classify(error)
    what = f"{error.message} ({error.reason})"
    if kind is Kind.UNCERTAIN:
        return Finish(
            status=Status.FAILED,
            transport=error.transport,
            error=error.message,
            reason=DELIVERY_UNCERTAIN,
            detail=f"{what}; it may have been delivered, so it is not tried again",
        )
    if kind is Kind.PERMANENT:
        return Finish(
            status=Status.FAILED,
            error=error.message,
            reason=error.reason,
            detail=what,
            transport=error.transport,
        )
    next_time = now + retry_delay(attempt, policy, rng)
    if expired(next_time, send_time, policy):
        # The next attempt would start after the max age: give up now rather than then.
        return Finish(
            status=Status.FAILED,
            transport=error.transport,
            error=error.message,
            reason=error.reason,
            detail=f"{what}; {_expired_detail(send_time, policy)}",
        )
    return Finish(
        status=Status.QUEUED,
        transport=error.transport,
        error=error.message,
        reason=error.reason,
        detail=f"{what}; next attempt at {_when(next_time)}",
        next_attempt_time=next_time,
    )


def uncertain(message: str) -> Finish:
    """An attempt that ended without an answer (the service stopped, an unexpected error)."""
    return Finish(
        status=Status.FAILED,
        error=message,
        reason=DELIVERY_UNCERTAIN,
        detail=f"{message}; it may have been delivered, so it is not tried again",
    )


# --- visibility


def sees_all(principal: Principal) -> bool:
    return principal.has_any([ADMIN])  # superadmin included


def can_see(principal: Principal, caller: str) -> bool:
    """Whether the principal may see a message sent by `caller` (else: NOT_FOUND, as missing)."""
    return principal.sub == caller or sees_all(principal)


def list_caller(principal: Principal, requested: str) -> str:
    """The caller filter a listing really uses: the requested one for admins, else one's own."""
    return requested if sees_all(principal) else principal.sub


def watch_sees(principal: Principal, event: Event, id: str = "") -> bool:
    """Whether a WatchMessages call (for message `id`, or all when empty) gets this event."""
    if id and event.message_id != id:
        return False
    return can_see(principal, event.caller)


# --- listing (AIP-132, AIP-158)


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument.one("page_size", "must not be negative")
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def page_token_key(secret: bytes) -> bytes:
    """A key for page tokens derived from the JWT secret: the same on every replica."""
    return hmac.new(secret, b"mailsvc page tokens v1", hashlib.sha256).digest()


class PageTokens:
    """Opaque, tamper-evident page tokens tied to the listing's filter."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, body: bytes) -> bytes:
        return hmac.digest(self._key, body, "sha256")[:16]  # one C call; hmac.new is Python

    @staticmethod
    def _filter(parts: tuple[object, ...]) -> str:
        raw = json.dumps([str(p) for p in parts], separators=(",", ":")).encode()
        return hashlib.sha256(raw).hexdigest()[:16]

    def encode(self, filter: tuple[object, ...], after: tuple[float, str]) -> str:
        """A token for the page after `after`, valid only with the same `filter` values."""
        body = json.dumps(
            {"f": self._filter(filter), "t": after[0], "i": after[1]}, separators=(",", ":")
        ).encode()
        return base64.urlsafe_b64encode(self._mac(body) + body).decode().rstrip("=")

    def decode(self, token: str, filter: tuple[object, ...]) -> tuple[float, str] | None:
        """The position a token stands for; None for an empty token."""
        if not token:
            return None
        bad = InvalidArgument.one("page_token", "not a page token of this listing")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            raise bad from None
        mac, body = raw[:16], raw[16:]
        if len(mac) < 16 or not hmac.compare_digest(mac, self._mac(body)):
            raise bad
        try:
            data = json.loads(body)
            position = (float(data["t"]), str(data["i"]))
            matches = data["f"] == self._filter(filter)
        except (ValueError, KeyError, TypeError):
            raise bad from None
        if not matches:
            raise InvalidArgument.one("page_token", "was made for a listing with other filters")
        return position
