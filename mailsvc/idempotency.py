"""Idempotent requests (AIP-155): a repeat of (caller, key) returns the first response.

Keys live in the Storage for 24 hours, so they survive a restart and are shared by replicas.
The first request reserves its key before it runs; a repeat that arrives while it is in
flight waits for it (in this process on its task, across processes by polling the reserved
entry). If the first fails, the reservation is released and nothing is kept, since nothing
was sent; the repeat then runs itself.

A reservation is a lease (--idempotency-lease), renewed while its request runs: a replica
that dies (or loses the database) mid-request stops renewing, and once the lease is over one
repeat takes the key over and runs the request itself. Had the dead one handed the mail over
already, that sends it twice: only a crash may, as with the queue's claims.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

from mailsvc.errors import InvalidArgument
from mailsvc.storage.base import Storage, StorageError

log = logging.getLogger(__name__)

LEASE_SECONDS = 30.0
POLL_SECONDS = 0.05  # how often a repeat looks whether another process's first call ended
RENEWALS_PER_LEASE = 3  # renewing at a third of the lease survives two failed renewals


def fingerprint(method: str, request_bytes: bytes) -> str:
    return hashlib.sha256(method.encode() + b"\0" + request_bytes).hexdigest()


def _mismatch() -> InvalidArgument:
    return InvalidArgument.one(
        "idempotency_key", "this key was already used for a different request"
    )


class IdempotencyStore:
    """Runs each (caller, key) once per TTL; one instance per server process."""

    def __init__(
        self,
        storage: Storage,
        *,
        lease: float = LEASE_SECONDS,
        poll: float = POLL_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._storage = storage
        self._lease = lease
        self._poll = poll
        self._clock = clock
        self._inflight: dict[tuple[str, str], tuple[str, asyncio.Task[bytes]]] = {}

    async def _execute(
        self,
        caller: str,
        key: str,
        call: Callable[[], Awaitable[bytes]],
        recorded: bool,
        lease_until: float,
    ) -> bytes:
        lease = _Lease(self, caller, key, lease_until)
        try:
            response = await call()
        except BaseException:
            until = await lease.stop()
            await self._storage.idempotency_release(caller, key, lease_until=until)
            raise
        await lease.stop()
        if not recorded:
            await self._storage.idempotency_complete(caller, key, response, now=self._clock())
        return response

    async def run(
        self,
        caller: str,
        key: str,
        fp: str,
        call: Callable[[], Awaitable[bytes]],
        *,
        recorded: bool = False,
    ) -> tuple[bytes, bool]:
        """The response for (caller, key), running `call` only if none is kept or in flight.

        Returns (response, replayed). The first call runs in its own task, so a caller that
        goes away mid-send does not stop it from being recorded for the retry. `recorded`:
        `call` stores the response itself, in the transaction of its own writes
        (Storage.insert(idempotency=...)), so a crash cannot keep the one without the other.
        """
        slot = (caller, key)
        while True:
            inflight = self._inflight.get(slot)
            if inflight is not None and not inflight[1].done():
                if inflight[0] != fp:
                    raise _mismatch()
                try:
                    return await asyncio.shield(inflight[1]), True
                except asyncio.CancelledError:
                    raise
                except Exception:
                    continue  # the first attempt failed and kept nothing: try ourselves
            now = self._clock()
            lease_until = now + self._lease
            entry = await self._storage.idempotency_reserve(
                caller, key, fp, now=now, lease_until=lease_until
            )
            if entry is None:
                break  # reserved for this call
            if entry.fingerprint != fp:
                raise _mismatch()
            if entry.response is not None:
                return entry.response, True
            # In flight: here (its task is about to be registered) or in another process.
            await asyncio.sleep(self._poll)
        task = asyncio.create_task(self._execute(caller, key, call, recorded, lease_until))
        self._inflight[slot] = (fp, task)
        task.add_done_callback(lambda t: self._forget(slot, t))
        return await asyncio.shield(task), False

    def _forget(self, slot: tuple[str, str], task: asyncio.Task[bytes]) -> None:
        if self._inflight.get(slot, (None, None))[1] is task:
            del self._inflight[slot]
        if not task.cancelled():
            task.exception()  # retrieved here, so an abandoned failure is not warned about

    async def aclose(self, timeout: float) -> None:
        """Let sends whose caller went away finish and be recorded (the store stays open)."""
        pending = [task for _, task in self._inflight.values()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)


class _Lease:
    """Keeps a reservation's lease ahead of the clock while its request runs.

    A timer rather than a task per request: most sends end long before the first renewal.
    """

    def __init__(self, store: IdempotencyStore, caller: str, key: str, until: float) -> None:
        self._store = store
        self._caller = caller
        self._key = key
        self.until = until
        self._period = store._lease / RENEWALS_PER_LEASE
        self._renewing: asyncio.Task[None] | None = None
        self._stopped = False
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            self._period, self._fire
        )

    def _fire(self) -> None:
        self._timer = None
        if not self._stopped:
            self._renewing = asyncio.create_task(self._renew())

    async def _renew(self) -> None:
        store = self._store
        new_until = store._clock() + store._lease
        try:
            held = await store._storage.idempotency_renew(
                self._caller, self._key, lease_until=self.until, new_until=new_until
            )
        except StorageError as exc:
            log.warning("cannot renew an idempotency key's reservation: %s", exc)
        else:
            if not held:
                # Taken over by a repeat: this process was stalled or cut off past the lease.
                log.warning("an idempotency key's reservation ran out while its request ran")
                return
            self.until = new_until
        if not self._stopped:
            self._timer = asyncio.get_running_loop().call_later(self._period, self._fire)

    async def stop(self) -> float:
        """Stop renewing; the lease's end as stored (for release)."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
        if self._renewing is not None and not self._renewing.done():
            await asyncio.shield(self._renewing)
        return self.until
