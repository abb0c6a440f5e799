"""The storage interface: plain data in, plain data out, no business rules.

Who may see what, the retry schedule, rate-limit rules and suppression matching are domain
functions elsewhere; a store only keeps rows and applies conditional updates atomically.
Times are seconds since the epoch (float, UTC).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol


class Status(enum.IntEnum):
    """A mail's status; the numbers are mailsvc.v1.MessageStatus's."""

    UNSPECIFIED = 0
    QUEUED = 1
    SCHEDULED = 2
    SENDING = 3
    SENT = 4
    DELIVERED = 5
    FAILED = 6
    BOUNCED = 7
    COMPLAINED = 8
    CANCELLED = 9


# Statuses in which a mail still has to be sent: its payload is kept only in these.
PENDING = frozenset({Status.QUEUED, Status.SCHEDULED, Status.SENDING})
CANCELLABLE = frozenset({Status.QUEUED, Status.SCHEDULED})


@dataclass(frozen=True, kw_only=True)
class Event:
    """One status change of one message."""

    message_id: str  # the record's id (Message.id), not the Message-ID header
    time: float
    status: Status
    detail: str = ""
    caller: str = ""  # the message's caller, so watchers can filter without a lookup


@dataclass(frozen=True, kw_only=True)
class NewMessage:
    """A record to create. `payload` is the mail to send (kept while pending)."""

    id: str
    caller: str
    status: Status  # QUEUED or SCHEDULED (queued), SENT or FAILED (synchronous sends)
    to: tuple[str, ...]
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    subject: str = ""
    template_name: str = ""
    create_time: float
    send_time: float  # send_at, else create_time; the first attempt is due then
    payload: bytes | None = None  # None for records of synchronous sends
    header_message_id: str = ""  # the Message-ID header, reused by every attempt
    transport: str = ""
    message_id: str = ""  # as in SendMailResponse, once sent
    suppressed: tuple[str, ...] = ()
    detail: str = ""  # detail of the first event
    last_error: str = ""  # for a record created FAILED
    last_error_reason: str = ""


def check_history(messages: Sequence[NewMessage]) -> None:
    """Storage.insert_history takes only records of mails already handed over."""
    if any(m.status in PENDING for m in messages):
        raise ValueError("a queued or scheduled mail is no history: use insert")


@dataclass(frozen=True, kw_only=True)
class MessageRecord:
    """A stored record, as GetMessage and ListMessages show it."""

    id: str
    caller: str
    status: Status
    to: tuple[str, ...]
    cc: tuple[str, ...]
    bcc: tuple[str, ...]
    subject: str
    template_name: str
    transport: str
    message_id: str
    create_time: float
    send_time: float
    update_time: float
    next_attempt_time: float | None
    attempts: int
    last_error: str
    last_error_reason: str
    suppressed: tuple[str, ...]
    events: tuple[Event, ...] = ()  # oldest first; may be empty in lists


@dataclass(frozen=True, kw_only=True)
class Claimed:
    """A message claimed for one attempt: SENDING, leased to this process until `lease_until`."""

    id: str
    caller: str
    payload: bytes
    header_message_id: str
    send_time: float
    attempts: int  # including this one
    lease_until: float


@dataclass(frozen=True, kw_only=True)
class ListQuery:
    """A page of records, newest first (create_time, then id, both descending)."""

    page_size: int
    # (create_time, id) of the last record of the previous page
    after: tuple[float, str] | None = None
    status: Status | None = None
    recipient: str = ""  # lower-cased address in to, cc or bcc
    caller: str = ""  # empty = any caller


@dataclass(frozen=True, kw_only=True)
class IdempotencyEntry:
    """What a repeat of (caller, key) must get."""

    fingerprint: str
    response: bytes | None  # None while the first request is still in flight


@dataclass(frozen=True, kw_only=True)
class Suppression:
    address: str  # lower-cased
    reason: int  # mailsvc.v1.SuppressionReason
    create_time: float
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class QuotaResult:
    """The outcome of `consume_quota`: counts after the call (unchanged when refused)."""

    allowed: bool
    minute_count: int
    day_count: int
    retry_after: float | None = None  # seconds until a retry could fit, when refused


@dataclass(frozen=True, kw_only=True)
class Finish:
    """The outcome of one attempt."""

    status: Status  # SENT, FAILED, or QUEUED (rescheduled)
    transport: str = ""
    message_id: str = ""
    error: str = ""
    reason: str = ""
    detail: str = ""
    next_attempt_time: float | None = None  # with QUEUED


class StorageError(Exception):
    """The store cannot do its job (disk full, database away); callers map it to UNAVAILABLE."""


class StorageOpenError(StorageError):
    """The store cannot be opened (corrupt, unwritable, in use, newer schema): do not start."""


class Storage(Protocol):
    """Everything a replica shares with the others (or keeps across restarts, embedded)."""

    # --- lifecycle of the store itself
    async def open(self) -> None: ...
    async def aclose(self) -> None: ...

    # --- message records and the queue
    async def insert(
        self,
        messages: Sequence[NewMessage],
        *,
        idempotency: tuple[str, str, str, bytes] | None = None,
    ) -> None:
        """Create records (one transaction, durable on return); with `idempotency`
        (caller, key, fingerprint, response) the key's response is stored in the same
        transaction. Raises StorageError."""
        ...

    async def insert_history(self, messages: Sequence[NewMessage]) -> None:
        """Create records of mails already handed over (SENT or FAILED, no payload, no key).
        Reads that start after it returns see them; the embedded store commits them a few
        milliseconds later without holding the caller, and logs a failure itself."""
        ...

    async def claim(self, *, now: float, limit: int, lease: float, owner: str) -> list[Claimed]:
        """Take up to `limit` due messages (QUEUED/SCHEDULED with next attempt or send time
        <= now, or SENDING whose lease has run out), oldest due first: each becomes SENDING
        with attempts + 1 and a lease until now + lease. No message is claimed twice at once."""
        ...

    async def finish(self, id: str, outcome: Finish, *, owner: str, now: float) -> Event | None:
        """Record an attempt's outcome if `owner` still holds the claim; SENT and FAILED drop
        the payload. Returns the event written, or None if the claim was lost."""
        ...

    async def cancel(self, id: str, *, now: float) -> tuple[MessageRecord | None, Event | None]:
        """QUEUED or SCHEDULED -> CANCELLED (payload dropped). Returns the record after the
        call (None if missing) and the event if it was cancelled by this call."""
        ...

    async def add_event(
        self, header_message_id: str, status: Status | None, detail: str, *, now: float
    ) -> Event | None:
        """A provider's report for the mail whose transport id (message_id) or Message-ID
        header matches: change its status when given (DELIVERED, BOUNCED, COMPLAINED) and add
        an event. None if no record matches."""
        ...

    async def get(self, id: str) -> MessageRecord | None: ...

    async def list_messages(self, query: ListQuery) -> list[MessageRecord]: ...

    async def next_due(self) -> float | None:
        """When the earliest pending message is due (None if none): for the workers' sleep."""
        ...

    async def queue_stats(self, *, now: float) -> dict[Status, int]:
        """Counts of records by status (metrics); the age of the oldest due message is
        `now - oldest_due()`."""
        ...

    async def oldest_due(self, *, now: float) -> float | None: ...

    async def purge(self, *, before: float, now: float) -> int:
        """Delete records whose last change is older than `before` (and their events; never a
        pending one) and idempotency keys, webhook tokens and counters expired at `now`.
        Returns records deleted."""
        ...

    # --- idempotency (AIP-155)
    async def idempotency_reserve(
        self, caller: str, key: str, fingerprint: str, *, now: float, lease_until: float
    ) -> IdempotencyEntry | None:
        """None: the key is now reserved by this call until `lease_until` (its lease, which
        also names the reservation to renew and release). That is so when the key was free,
        expired, or held by a reservation without a response whose lease ended by `now` (its
        request died): of concurrent callers, one takes it. Otherwise the entry another call
        made (its response, or None while it is in flight)."""
        ...

    async def idempotency_renew(
        self, caller: str, key: str, *, lease_until: float, new_until: float
    ) -> bool:
        """Move the lease of the reservation holding `lease_until` to `new_until`. False if
        that reservation is gone (completed, released, or taken over after its lease)."""
        ...

    async def idempotency_complete(
        self, caller: str, key: str, response: bytes, *, now: float | None = None
    ) -> None:
        """Store the response; it is kept 24 hours from `now` (default: the clock)."""
        ...

    async def idempotency_release(self, caller: str, key: str, *, lease_until: float) -> None:
        """The first request failed and sent nothing: forget its reservation (the one holding
        `lease_until`, not a taker's)."""
        ...

    # --- suppressions
    async def suppressed(self, addresses: Sequence[str]) -> set[str]:
        """The subset of these lower-cased addresses that is suppressed."""
        ...

    async def add_suppression(self, entry: Suppression) -> Suppression: ...
    async def delete_suppression(self, address: str) -> bool: ...
    async def list_suppressions(self, *, page_size: int, after: str = "") -> list[Suppression]: ...

    # --- rate limits
    async def consume_quota(
        self, caller: str, count: int, *, now: float, per_minute: int, per_day: int
    ) -> QuotaResult:
        """Add `count` mails to the caller's rolling minute and UTC day if both stay within
        their limits (0 = no limit); otherwise add nothing. Atomic across replicas."""
        ...

    # --- webhook tokens
    async def remember_token(self, token: str, *, now: float, ttl: float) -> bool:
        """True if the token is new (and is now remembered), False if seen before."""
        ...

    async def webhook_event(
        self,
        token: str,
        *,
        ttl: float,
        header_message_id: str,
        status: Status | None,
        detail: str,
        suppression: Suppression | None,
        now: float,
    ) -> tuple[bool, Event | None]:
        """One provider report in one transaction: remember `token` as remember_token does
        (False, None and nothing else when it was seen before), then add_event, then, when a
        record matched, add `suppression`. A failure leaves nothing, not even the token,
        so the provider's retry with the same token is applied."""
        ...

    # --- change feed
    def events(self) -> AsyncIterator[Event]:
        """Every event written from now on by any process sharing the store, in order per
        message. Each call gives an independent subscription; closing the iterator ends it."""
        ...
