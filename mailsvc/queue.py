"""Background delivery of queued mail: claim what is due, attempt it, record the outcome.

One dispatcher claims due messages while fewer than `workers` attempts are in flight, and
otherwise sleeps until the earliest due time or a `wake()` (called after an insert): no
busy polling. Each attempt runs in its own task, bounded in time by the lease so that no
other claimant can take the message while it is still being attempted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from mailsvc import lifecycle, payload
from mailsvc.errors import MailsvcError
from mailsvc.lifecycle import RetryPolicy
from mailsvc.message import Mail
from mailsvc.storage.base import Claimed, Finish, Status, Storage, StorageError

log = logging.getLogger(__name__)

LEASE_MARGIN = 0.1  # an attempt must end this share of the lease before the lease does
MAX_SLEEP = 30.0  # look again at least this often (wall-clock jumps, other replicas' inserts)
STORAGE_RETRY = 1.0  # wait after the store failed before claiming again
FINISH_TRIES = 5


@dataclass(frozen=True, kw_only=True)
class Attempt:
    """One background attempt, as the send function gets it."""

    mail: Mail
    header_message_id: str  # the same in every attempt of this message
    timeout: float  # the attempt must be over by then (seconds from its start)


class Delivered(Protocol):
    """What a successful send reports (mailsvc.transports.base.Delivery fits)."""

    @property
    def message_id(self) -> str: ...

    @property
    def transport(self) -> str: ...


SendFn = Callable[[Attempt], Awaitable[Delivered]]
# Told of every recorded outcome: (claimed message, outcome, seconds the attempt took).
FinishHook = Callable[[Claimed, Finish, float], None]


class QueueWorkers:
    """The queue's workers in this process; `start()`, `wake()` after inserts, `aclose()`."""

    def __init__(
        self,
        storage: Storage,
        send: SendFn,
        *,
        owner: str,
        workers: int = 16,
        policy: RetryPolicy | None = None,
        lease: float = 60.0,
        retention: float = 604800.0,
        purge_every: float = 3600.0,
        on_finish: FinishHook | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._storage = storage
        self._send = send
        self._owner = owner
        self._workers = max(1, workers)
        self._policy = policy or RetryPolicy()
        self._lease = lease
        self._retention = retention
        self._purge_every = purge_every
        self._on_finish = on_finish
        self._clock = clock
        self._rng = rng or random.Random()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._in_flight: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._dispatch(), name="queue-dispatch"),
            asyncio.create_task(self._purge_forever(), name="queue-purge"),
        ]

    def wake(self) -> None:
        """Something may be due now (a mail was queued): look without waiting."""
        # With every worker busy the dispatcher waits for one to end (_done wakes it), and
        # looks then: waking it for each mail queued meanwhile would be work for nothing.
        if len(self._in_flight) < self._workers:
            self._wakeup.set()

    async def _sleep(self, seconds: float | None) -> None:
        timeout = MAX_SLEEP if seconds is None else min(max(seconds, 0.0), MAX_SLEEP)
        # asyncio.timeout, not wait_for: on 3.11 wait_for may swallow a cancel that arrives
        # as the event is set, and the loop would then never end.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wakeup.wait()

    async def _dispatch(self) -> None:
        while not self._stopping:
            self._wakeup.clear()  # before looking: a wake() from now on is not lost
            free = self._workers - len(self._in_flight)
            if free <= 0:
                await self._sleep(None)  # a finishing attempt wakes us
                continue
            try:
                claimed = await self._storage.claim(
                    now=self._clock(), limit=free, lease=self._lease, owner=self._owner
                )
            except StorageError as exc:
                log.error("queue: cannot claim due mail: %s", exc)
                await self._sleep(STORAGE_RETRY)
                continue
            for message in claimed:
                task = asyncio.create_task(self._attempt(message), name=f"attempt-{message.id}")
                self._in_flight.add(task)
                task.add_done_callback(self._done)
            if len(claimed) == free or self._stopping:
                continue  # the slots are full, or there may be more due right now
            try:
                due = await self._storage.next_due()
            except StorageError as exc:
                log.error("queue: cannot read the next due time: %s", exc)
                due = self._clock() + STORAGE_RETRY
            if due is None:
                await self._sleep(None)
            else:
                await self._sleep(due - self._clock())

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wakeup.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("queue: attempt task failed", exc_info=task.exception())

    async def _attempt(self, claimed: Claimed) -> None:
        started = self._clock()
        try:
            outcome = await self._outcome(claimed, started)
        except asyncio.CancelledError:
            # Stopped past the grace period mid-attempt: it may have been handed over.
            outcome = lifecycle.uncertain("the service stopped during the attempt")
            await asyncio.shield(self._record(claimed, outcome, started))
            raise
        await self._record(claimed, outcome, started)

    async def _outcome(self, claimed: Claimed, started: float) -> Finish:
        if lifecycle.expired(started, claimed.send_time, self._policy):
            return lifecycle.gave_up_expired(claimed.send_time, self._policy)
        try:
            queued = payload.decode(claimed.payload)
        except payload.PayloadError as exc:
            log.error("queue: message %s: unreadable payload: %s", claimed.id, exc)
            return Finish(
                status=Status.FAILED,
                error="the stored mail could not be read",
                reason="PAYLOAD_UNREADABLE",
                detail="the stored mail could not be read",
            )
        budget = max(claimed.lease_until - started, 0.0) * (1 - LEASE_MARGIN)
        attempt = Attempt(
            mail=queued.mail,
            header_message_id=queued.header_message_id or claimed.header_message_id,
            timeout=budget,
        )
        try:
            async with asyncio.timeout(budget):
                delivered = await self._send(attempt)
        except MailsvcError as exc:
            return lifecycle.after_failure(
                exc,
                now=self._clock(),
                send_time=claimed.send_time,
                attempt=claimed.attempts,
                policy=self._policy,
                rng=self._rng,
            )
        except TimeoutError:
            return lifecycle.uncertain("the attempt did not end within the queue lease")
        except Exception:
            log.exception("queue: message %s: unexpected error in an attempt", claimed.id)
            return lifecycle.uncertain("the attempt ended with an internal error")
        return lifecycle.sent(delivered.transport, delivered.message_id)

    async def _record(self, claimed: Claimed, outcome: Finish, started: float) -> None:
        for attempt in range(FINISH_TRIES):
            try:
                event = await self._storage.finish(
                    claimed.id, outcome, owner=self._owner, now=self._clock()
                )
            except StorageError as exc:
                # Left alone, the lease runs out and the mail is attempted again: keep trying.
                log.error("queue: message %s: cannot record the outcome: %s", claimed.id, exc)
                await asyncio.sleep(STORAGE_RETRY * 2**attempt)
                continue
            if event is None:
                log.warning("queue: message %s: the claim was lost before its outcome", claimed.id)
            elif self._on_finish is not None:
                self._on_finish(claimed, outcome, self._clock() - started)
            return

    async def _purge_forever(self) -> None:
        while not self._stopping:
            now = self._clock()
            try:
                purged = await self._storage.purge(before=now - self._retention, now=now)
            except StorageError as exc:
                log.error("queue: purge failed: %s", exc)
            else:
                if purged:
                    log.info("purged %d message records past retention", purged)
            await asyncio.sleep(self._purge_every)

    async def aclose(self, grace: float) -> None:
        """Stop claiming; let attempts in flight end within `grace`; the rest stays queued."""
        self._stopping = True
        self._wakeup.set()
        if self._tasks:
            dispatch, purge = self._tasks
            purge.cancel()
            # Not cancelled: a claim cut short would leave its messages leased to nobody.
            await asyncio.wait([dispatch], timeout=grace)
            dispatch.cancel()
            await asyncio.gather(dispatch, purge, return_exceptions=True)
        pending = set(self._in_flight)
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
