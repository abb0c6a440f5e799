"""Idempotent requests (AIP-155): a repeat of (caller, key) returns the first response.

Responses are kept in SQLite in the data dir for 24 hours, so they survive a restart. A repeat
that arrives while the first is in flight waits for it; if the first fails, nothing is kept
and the repeat runs itself, since nothing was sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from mailsvc.errors import InvalidArgument

TTL_SECONDS = 24 * 3600
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    caller TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    response BLOB NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (caller, key)
)
"""


def fingerprint(method: str, request_bytes: bytes) -> str:
    return hashlib.sha256(method.encode() + b"\0" + request_bytes).hexdigest()


def _mismatch() -> InvalidArgument:
    return InvalidArgument.one(
        "idempotency_key", "this key was already used for a different request"
    )


class IdempotencyStore:
    """Remembers responses by (caller, key); one instance per server process."""

    def __init__(self, path: Path, *, ttl: float = TTL_SECONDS) -> None:
        self._ttl = ttl
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        self._inflight: dict[tuple[str, str], tuple[str, asyncio.Task[bytes]]] = {}
        path.chmod(0o600)
        self.purge()

    def purge(self) -> int:
        """Forget responses older than the TTL; returns how many."""
        cursor = self._db.execute(
            "DELETE FROM responses WHERE created < ?", (time.time() - self._ttl,)
        )
        return cursor.rowcount

    def _lookup(self, caller: str, key: str) -> tuple[str, bytes] | None:
        row = self._db.execute(
            "SELECT fingerprint, response FROM responses WHERE caller = ? AND key = ? "
            "AND created >= ?",
            (caller, key, time.time() - self._ttl),
        ).fetchone()
        return (row[0], row[1]) if row else None

    def _save(self, caller: str, key: str, fp: str, response: bytes) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
            (caller, key, fp, response, time.time()),
        )

    async def _execute(
        self, caller: str, key: str, fp: str, call: Callable[[], Awaitable[bytes]]
    ) -> bytes:
        response = await call()
        await asyncio.to_thread(self._save, caller, key, fp, response)
        return response

    async def run(
        self,
        caller: str,
        key: str,
        fp: str,
        call: Callable[[], Awaitable[bytes]],
    ) -> tuple[bytes, bool]:
        """The response for (caller, key), running `call` only if none is kept or in flight.

        Returns (response, replayed). The first call runs in its own task, so a caller that
        goes away mid-send does not stop it from being recorded for the retry.
        """
        slot = (caller, key)
        while True:
            kept = self._lookup(caller, key)
            if kept is not None:
                if kept[0] != fp:
                    raise _mismatch()
                return kept[1], True
            inflight = self._inflight.get(slot)
            if inflight is None or inflight[1].done():
                break
            if inflight[0] != fp:
                raise _mismatch()
            try:
                return await asyncio.shield(inflight[1]), True
            except asyncio.CancelledError:
                raise
            except Exception:
                continue  # the first attempt failed and kept nothing: try ourselves
        task = asyncio.create_task(self._execute(caller, key, fp, call))
        self._inflight[slot] = (fp, task)
        task.add_done_callback(lambda t: self._forget(slot, t))
        return await asyncio.shield(task), False

    def _forget(self, slot: tuple[str, str], task: asyncio.Task[bytes]) -> None:
        if self._inflight.get(slot, (None, None))[1] is task:
            del self._inflight[slot]
        if not task.cancelled():
            task.exception()  # retrieved here, so an abandoned failure is not warned about

    async def aclose(self, timeout: float) -> None:
        """Let sends whose caller went away finish and be recorded, then close the store."""
        pending = [task for _, task in self._inflight.values()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        self._db.close()
