"""IdempotencyStore on top of the Storage (SQLite): one run per key, across instances too."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mailsvc.errors import InvalidArgument, Unavailable
from mailsvc.idempotency import IdempotencyStore
from mailsvc.storage.sqlite import FILE_NAME, SqliteStorage

pytestmark = pytest.mark.anyio


class Sender:
    """Counts runs; each run may be held until released."""

    def __init__(self, response: bytes = b"response") -> None:
        self.runs = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.response = response
        self.fail: Exception | None = None

    async def __call__(self) -> bytes:
        self.runs += 1
        await self.gate.wait()
        if self.fail is not None:
            fail, self.fail = self.fail, None  # once
            raise fail
        return self.response + str(self.runs).encode()


async def test_a_repeat_gets_the_first_response_without_running(storage: SqliteStorage) -> None:
    keys = IdempotencyStore(storage)
    send = Sender()
    assert await keys.run("alice", "k", "fp", send) == (b"response1", False)
    assert await keys.run("alice", "k", "fp", send) == (b"response1", True)
    assert send.runs == 1
    # Another caller with the same key is another request.
    assert await keys.run("bert", "k", "fp", send) == (b"response2", False)


async def test_the_same_key_for_another_request_is_refused(storage: SqliteStorage) -> None:
    keys = IdempotencyStore(storage)
    await keys.run("alice", "k", "fp1", Sender())
    with pytest.raises(InvalidArgument) as info:
        await keys.run("alice", "k", "fp2", Sender())
    assert info.value.violations[0].field == "idempotency_key"


async def test_repeats_during_the_first_wait_for_it(storage: SqliteStorage) -> None:
    keys = IdempotencyStore(storage)
    send = Sender()
    send.gate.clear()
    first = asyncio.create_task(keys.run("alice", "k", "fp", send))
    repeats = [asyncio.create_task(keys.run("alice", "k", "fp", send)) for _ in range(5)]
    await asyncio.sleep(0.2)
    assert send.runs == 1 and not any(t.done() for t in repeats)
    send.gate.set()
    assert await first == (b"response1", False)
    assert [await t for t in repeats] == [(b"response1", True)] * 5


async def test_another_process_waits_on_the_stored_reservation(storage: SqliteStorage) -> None:
    # Two instances share nothing but the store, as two replicas would.
    here, there = IdempotencyStore(storage), IdempotencyStore(storage, poll=0.02)
    send = Sender()
    send.gate.clear()
    first = asyncio.create_task(here.run("alice", "k", "fp", send))
    await asyncio.sleep(0.1)
    repeat = asyncio.create_task(there.run("alice", "k", "fp", send))
    await asyncio.sleep(0.2)
    assert not repeat.done()
    send.gate.set()
    assert await first == (b"response1", False)
    assert await asyncio.wait_for(repeat, 5) == (b"response1", True)
    assert send.runs == 1


async def test_a_failed_first_keeps_nothing(storage: SqliteStorage) -> None:
    keys, other = IdempotencyStore(storage), IdempotencyStore(storage, poll=0.02)
    send = Sender()
    send.gate.clear()
    send.fail = Unavailable("down")
    first = asyncio.create_task(keys.run("alice", "k", "fp", send))
    waiting = asyncio.create_task(keys.run("alice", "k", "fp", send))
    elsewhere = asyncio.create_task(other.run("alice", "k", "fp", send))
    await asyncio.sleep(0.1)
    assert send.runs == 1
    send.gate.set()  # the first run fails; the waiters then run themselves, one of them once
    with pytest.raises(Unavailable):
        await first
    results = sorted([await waiting, await elsewhere], key=lambda r: r[1])
    assert results[0][1] is False and results[1] == (results[0][0], True)
    assert send.runs == 2


async def test_a_caller_hanging_up_does_not_stop_the_first_send(storage: SqliteStorage) -> None:
    keys = IdempotencyStore(storage)
    send = Sender()
    send.gate.clear()
    first = asyncio.create_task(keys.run("alice", "k", "fp", send))
    await asyncio.sleep(0.1)
    first.cancel()
    await asyncio.sleep(0.05)
    send.gate.set()
    await keys.aclose(5)  # lets the abandoned send finish and be recorded
    assert await keys.run("alice", "k", "fp", send) == (b"response1", True)
    assert send.runs == 1


async def test_responses_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    store = SqliteStorage(path)
    await store.open()
    await IdempotencyStore(store).run("alice", "k", "fp", Sender())
    await store.aclose()
    store = SqliteStorage(path)
    await store.open()
    try:
        send = Sender()
        assert await IdempotencyStore(store).run("alice", "k", "fp", send) == (b"response1", True)
        assert send.runs == 0
    finally:
        await store.aclose()


async def test_keys_expire_after_the_ttl(storage: SqliteStorage) -> None:
    now = [1_750_000_000.0]
    keys = IdempotencyStore(storage, clock=lambda: now[0])
    send = Sender()
    await keys.run("alice", "k", "fp", send)
    now[0] += 24 * 3600 - 1
    assert await keys.run("alice", "k", "fp", send) == (b"response1", True)
    now[0] += 2
    assert await keys.run("alice", "k", "fp", send) == (b"response2", False)
