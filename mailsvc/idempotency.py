"""Idempotent requests (AIP-155): a repeat of (caller, key) returns the first response.

Keys live in the Storage for 24 hours, so they survive a restart and are shared by replicas.
The first request reserves its key before it runs; a repeat that arrives while it is in
flight waits for it (in this process on its task, across processes by polling the reserved
entry). If the first fails, the reservation is released and nothing is kept, since nothing
was sent; the repeat then runs itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

from mailsvc.errors import InvalidArgument
from mailsvc.storage.base import Storage

log = logging.getLogger(__name__)

TTL_SECONDS = 24 * 3600
POLL_SECONDS = 0.05  # how often a repeat looks whether another process's first call ended


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
        ttl: float = TTL_SECONDS,
        poll: float = POLL_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._storage = storage
        self._ttl = ttl
        self._poll = poll
        self._clock = clock
        self._inflight: dict[tuple[str, str], tuple[str, asyncio.Task[bytes]]] = {}

    async def _execute(
        self, caller: str, key: str, call: Callable[[], Awaitable[bytes]], recorded: bool
    ) -> bytes:
        try:
            response = await call()
        except BaseException:
            await self._storage.idempotency_release(caller, key)
            raise
        if not recorded:
            await self._storage.idempotency_complete(caller, key, response)
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
            entry = await self._storage.idempotency_reserve(
                caller, key, fp, now=self._clock(), ttl=self._ttl
            )
            if entry is None:
                break  # reserved for this call
            if entry.fingerprint != fp:
                raise _mismatch()
            if entry.response is not None:
                return entry.response, True
            # In flight: here (its task is about to be registered) or in another process.
            await asyncio.sleep(self._poll)
        task = asyncio.create_task(self._execute(caller, key, call, recorded))
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
