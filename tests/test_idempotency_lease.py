"""Idempotency reservations are leases: renewed while the first request runs, taken over by a
repeat once their holder is gone. Two IdempotencyStore instances on one store stand for two
replicas (each keeps its own in-process state)."""

from __future__ import annotations

import asyncio
import time

import pytest

from mailsvc.idempotency import IdempotencyStore
from mailsvc.storage.sqlite import SqliteStorage

pytestmark = pytest.mark.anyio

LEASE = 0.3


class Slow:
    """A send that takes `seconds`; counts its runs."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.runs = 0
        self.started = asyncio.Event()

    async def __call__(self) -> bytes:
        self.runs += 1
        run = self.runs
        self.started.set()
        await asyncio.sleep(self.seconds)
        return f"response{run}".encode()


async def test_a_first_request_longer_than_the_lease_keeps_its_key(
    storage: SqliteStorage,
) -> None:
    a = IdempotencyStore(storage, lease=LEASE)
    b = IdempotencyStore(storage, lease=LEASE)
    send = Slow(5 * LEASE)
    first = asyncio.create_task(a.run("alice", "k", "fp", send))
    await send.started.wait()
    # The repeat on the other replica polls throughout the first's five leases.
    assert await b.run("alice", "k", "fp", send) == (b"response1", True)
    assert await first == (b"response1", False)
    assert send.runs == 1


async def test_a_reservation_left_by_a_dead_replica_is_taken_over_after_its_lease(
    storage: SqliteStorage,
) -> None:
    # What a replica killed mid-send leaves: a reservation nobody renews or completes.
    now = time.time()
    reserved = await storage.idempotency_reserve(
        "alice", "k", "fp", now=now, lease_until=now + LEASE
    )
    assert reserved is None
    b = IdempotencyStore(storage, lease=LEASE)
    c = IdempotencyStore(storage, lease=LEASE)
    send = Slow(0.05)
    started = time.monotonic()
    results = await asyncio.wait_for(
        asyncio.gather(b.run("alice", "k", "fp", send), c.run("alice", "k", "fp", send)),
        timeout=10,
    )
    waited = time.monotonic() - started
    assert sorted(results) == [(b"response1", False), (b"response1", True)]
    assert send.runs == 1
    assert waited >= LEASE * 0.5  # a live-looking reservation was not taken at once
    assert await b.run("alice", "k", "fp", send) == (b"response1", True)
