"""Accepting mail: suppressions, rate limit, then a synchronous send or a durable queue entry.

Used by SendMail, SendTemplatedMail and SendMailBatch alike, with mails already validated.
Every accepted mail gets a record: a synchronous send inserts it (SENT, or FAILED with the
error) after the hand-over; a queued one is inserted QUEUED or SCHEDULED with its payload,
durably, before the caller hears back, and the queue workers are woken.

Idempotency: the caller passes `keep`, which turns the accepted mails into the stored
response of the key; it is written in the same transaction as the records
(Storage.insert(idempotency=...)), so a crash cannot keep a queued mail without its key, and a
repeat after a restart gets the same id.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mailsvc.addresses import Address
from mailsvc.auth import Principal
from mailsvc.errors import FailedPrecondition, MailsvcError
from mailsvc.lifecycle import Plan
from mailsvc.limits import LimitTable, QuotaExceeded, RateLimiter
from mailsvc.mailer import Mailer
from mailsvc.message import Mail
from mailsvc.metrics import Metrics
from mailsvc.mime import new_message_id
from mailsvc.payload import encode
from mailsvc.queue import Attempt
from mailsvc.storage.base import NewMessage, Status, Storage, StorageError
from mailsvc.store import Snapshot
from mailsvc.suppression import Filtered, apply_suppressions, lookup_keys
from mailsvc.transports.base import Delivery

log = logging.getLogger(__name__)

ALL_SUPPRESSED = "ALL_RECIPIENTS_SUPPRESSED"
SUPPRESSION_CHECK_SECONDS = 1.0  # how long "the list is empty" is believed without a look

# (caller, key, fingerprint, response) of an idempotency key, for Storage.insert
KeyEntry = tuple[str, str, str, bytes]


@dataclass(frozen=True, kw_only=True)
class Outgoing:
    """One validated mail to accept."""

    mail: Mail
    template_name: str = ""


@dataclass(frozen=True, kw_only=True)
class Accepted:
    """What the caller hears about one accepted mail."""

    id: str
    status: Status
    suppressed: tuple[str, ...] = ()
    delivery: Delivery | None = None  # synchronous sends only


Keep = Callable[[list[Accepted]], KeyEntry]


def new_id() -> str:
    """A record id: unique and opaque (not a secret: visibility is checked on every read)."""
    return f"{time.time_ns():x}{random.getrandbits(64):016x}"


class SuppressionCache:
    """Skips the store while the suppression list is known to be empty.

    Additions through this process say so at once (`note_added`); those of other processes or
    replicas are seen within SUPPRESSION_CHECK_SECONDS.
    """

    def __init__(self, storage: Storage, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._storage = storage
        self._clock = clock
        self._any = True
        self._fresh_until = 0.0

    def note_added(self) -> None:
        self._any = True
        self._fresh_until = self._clock() + SUPPRESSION_CHECK_SECONDS

    async def suppressed(self, addresses: Sequence[str]) -> set[str]:
        """The lower-cased addresses among these that are suppressed."""
        now = self._clock()
        if now >= self._fresh_until:
            self._any = bool(await self._storage.list_suppressions(page_size=1))
            self._fresh_until = now + SUPPRESSION_CHECK_SECONDS
        if not self._any or not addresses:
            return set()
        return await self._storage.suppressed(addresses)


def _kept(mail: Mail, filtered: Filtered[Address]) -> Mail:
    if not filtered.suppressed:
        return mail
    return dataclasses.replace(mail, to=filtered.to, cc=filtered.cc, bcc=filtered.bcc)


class Sender:
    """The accept path; one per server process."""

    def __init__(
        self,
        storage: Storage,
        mailer: Mailer,
        metrics: Metrics,
        *,
        wake: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._storage = storage
        self._mailer = mailer
        self._metrics = metrics
        self._limiter = RateLimiter(storage)
        self._limits: tuple[str, LimitTable] | None = None
        self.suppressions = SuppressionCache(storage)
        self.wake = wake
        self._clock = clock

    def _limit_table(self, snapshot: Snapshot) -> LimitTable:
        cached = self._limits
        if cached is None or cached[0] != snapshot.etag:
            cached = (snapshot.etag, LimitTable(snapshot.settings.rate_limits))
            self._limits = cached
        return cached[1]

    async def accept(
        self,
        principal: Principal,
        snapshot: Snapshot,
        batch: Sequence[Outgoing],
        *,
        plan: Plan | None,
        timeout: float | None,
        keep: Keep | None = None,
    ) -> list[Accepted]:
        """Send (plan None: exactly one mail) or queue the mails; raise if none may go."""
        now = self._clock()
        found = await self.suppressions.suppressed(
            lookup_keys(*(r for o in batch for r in (o.mail.to, o.mail.cc, o.mail.bcc)))
        )
        filtered: list[Filtered[Address]] = [
            apply_suppressions(o.mail.to, o.mail.cc, o.mail.bcc, found) for o in batch
        ]
        if plan is None and filtered[0].nothing_left:
            self._metrics.suppressed_recipients.inc(len(filtered[0].suppressed))
            raise FailedPrecondition(
                "every recipient is on the suppression list: nothing was sent",
                reason=ALL_SUPPRESSED,
            )
        count = sum(1 for f in filtered if not f.nothing_left)
        try:
            await self._limiter.check(principal, count, self._limit_table(snapshot), now)
        except QuotaExceeded as exc:
            self._metrics.rate_limited.labels(exc.reason).inc()
            raise
        suppressed = sum(len(f.suppressed) for f in filtered)
        if suppressed:
            self._metrics.suppressed_recipients.inc(suppressed)
        if plan is None:
            sent = await self._send_now(
                principal, snapshot, batch[0], filtered[0], now=now, timeout=timeout, keep=keep
            )
            return [sent]
        return await self._queue(principal, batch, filtered, plan, now=now, keep=keep)

    async def _send_now(
        self,
        principal: Principal,
        snapshot: Snapshot,
        outgoing: Outgoing,
        filtered: Filtered[Address],
        *,
        now: float,
        timeout: float | None,
        keep: Keep | None,
    ) -> Accepted:
        id = new_id()
        mail = _kept(outgoing.mail, filtered)
        try:
            delivery = await self._mailer.send(snapshot, mail, timeout=timeout)
        except MailsvcError as exc:
            failed = _record(
                id,
                principal,
                outgoing,
                mail,
                filtered.suppressed,
                now=now,
                send_time=now,
                status=Status.FAILED,
                last_error=exc.message,
                last_error_reason=exc.reason,
                detail=f"{exc.message} ({exc.reason})",
            )
            try:
                await self._storage.insert_history([failed])
            except StorageError as store_exc:
                log.error("message %s failed and its record was not kept: %s", id, store_exc)
            raise
        accepted = Accepted(
            id=id, status=Status.SENT, suppressed=filtered.suppressed, delivery=delivery
        )
        # Built once, after the hand-over: dataclasses.replace costs as much again.
        sent = _record(
            id,
            principal,
            outgoing,
            mail,
            filtered.suppressed,
            now=now,
            send_time=now,
            status=Status.SENT,
            transport=delivery.transport,
            message_id=delivery.message_id,
            # No header id to keep for later attempts; over SMTP, message_id is that header,
            # and webhooks look a mail up by either (one index the less to write).
            detail=f"handed over to {delivery.transport}",
        )
        entry = keep([accepted]) if keep else None
        try:
            if entry is None:
                await self._storage.insert_history([sent])
            else:
                await self._storage.insert([sent], idempotency=entry)
        except StorageError as exc:
            # The mail is out: the caller must hear so, or a retry would send it again.
            log.error("message %s was sent but its record was not kept: %s", id, exc)
            if entry is not None:
                try:
                    await self._storage.idempotency_complete(*entry[:2], entry[3])
                except StorageError:
                    log.error("message %s: its idempotency key was not kept either", id)
        return accepted

    async def _queue(
        self,
        principal: Principal,
        batch: Sequence[Outgoing],
        filtered: list[Filtered[Address]],
        plan: Plan,
        *,
        now: float,
        keep: Keep | None,
    ) -> list[Accepted]:
        records: list[NewMessage] = []
        accepted: list[Accepted] = []
        # The contract's send_time is send_at, else create_time: the same instant, not the
        # servicer's slightly earlier clock reading.
        send_time = plan.send_time if plan.status is Status.SCHEDULED else now
        for outgoing, f in zip(batch, filtered, strict=True):
            mail = _kept(outgoing.mail, f)
            if f.nothing_left:
                record = _record(
                    new_id(),
                    principal,
                    outgoing,
                    mail,
                    f.suppressed,
                    now=now,
                    send_time=send_time,
                    status=Status.FAILED,
                    last_error="every recipient is on the suppression list",
                    last_error_reason=ALL_SUPPRESSED,
                    detail="every recipient is on the suppression list: nothing will be sent",
                )
            else:
                header = new_message_id(mail.sender)
                scheduled = plan.status is Status.SCHEDULED
                record = _record(
                    new_id(),
                    principal,
                    outgoing,
                    mail,
                    f.suppressed,
                    now=now,
                    send_time=send_time,
                    status=plan.status,
                    payload=encode(mail, header),
                    header_message_id=header,
                    detail="scheduled" if scheduled else "queued",
                )
            records.append(record)
            accepted.append(Accepted(id=record.id, status=record.status, suppressed=f.suppressed))
        await self._storage.insert(records, idempotency=keep(accepted) if keep else None)
        self.wake()
        return accepted

    async def attempt(self, attempt: Attempt, snapshot: Snapshot) -> Delivery:
        """One background attempt of a queued mail, with the settings of now."""
        return await self._mailer.send(
            snapshot, attempt.mail, timeout=attempt.timeout, message_id=attempt.header_message_id
        )


def _record(
    id: str,
    principal: Principal,
    outgoing: Outgoing,
    mail: Mail,
    suppressed: tuple[str, ...],
    *,
    now: float,
    send_time: float,
    status: Status,
    detail: str,
    payload: bytes | None = None,
    header_message_id: str = "",
    transport: str = "",
    message_id: str = "",
    last_error: str = "",
    last_error_reason: str = "",
) -> NewMessage:
    return NewMessage(
        id=id,
        caller=principal.sub,
        status=status,
        to=tuple(str(a) for a in mail.to),
        cc=tuple(str(a) for a in mail.cc),
        bcc=tuple(str(a) for a in mail.bcc),
        subject=mail.subject,
        template_name=outgoing.template_name,
        create_time=now,
        send_time=send_time,
        suppressed=suppressed,
        payload=payload,
        header_message_id=header_message_id,
        transport=transport,
        message_id=message_id,
        detail=detail,
        last_error=last_error,
        last_error_reason=last_error_reason,
    )
