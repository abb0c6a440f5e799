"""PostgresStorage against a real PostgreSQL (tests/pg.py): the Storage behaviour, several
instances sharing one database, concurrent schema creation, a database that goes away."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from mailsvc.storage.base import (
    Event,
    Finish,
    ListQuery,
    NewMessage,
    Status,
    StorageError,
    Suppression,
)
from mailsvc.storage.postgres import PostgresStorage
from tests import pg
from tests.helpers import run

T = TypeVar("T")
NOW = 1_800_000_000.0


@asynccontextmanager
async def opened(url: str, **kwargs: Any) -> AsyncIterator[PostgresStorage]:
    store = PostgresStorage(url, **kwargs)
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()


def new(id: str, *, status: Status = Status.QUEUED, t: float = NOW, **kw: Any) -> NewMessage:
    fields: dict[str, Any] = {
        "caller": "alice",
        "to": ("Bob@Example.com",),
        "subject": f"subject {id}",
        "create_time": t,
        "send_time": t,
        "payload": b"mail " + id.encode(),
        "header_message_id": f"<{id}@mailsvc>",
        "detail": "accepted",
    }
    fields.update(kw)
    return NewMessage(id=id, status=status, **fields)


async def next_events(it: AsyncIterator[Event], n: int, timeout: float = 5) -> list[Event]:
    async def take() -> list[Event]:
        return [await anext(it) for _ in range(n)]

    return await asyncio.wait_for(take(), timeout)


# --- the Storage behaviour


def test_insert_get_and_list(pg_url: str) -> None:
    async def main() -> None:
        async with opened(pg_url) as store:
            await store.insert(
                [
                    new("m1", t=NOW, cc=("Carol@example.com",)),
                    new("m2", t=NOW + 1, caller="bob", to=("dave@example.com",)),
                    new("m3", t=NOW + 2, status=Status.SCHEDULED, send_time=NOW + 100),
                ]
            )
            got = await store.get("m1")
            assert got is not None
            assert (got.status, got.caller, got.to, got.cc, got.subject) == (
                Status.QUEUED,
                "alice",
                ("Bob@Example.com",),
                ("Carol@example.com",),
                "subject m1",
            )
            assert [(e.status, e.detail) for e in got.events] == [(Status.QUEUED, "accepted")]
            assert await store.get("nope") is None

            page = await store.list_messages(ListQuery(page_size=2))
            assert [r.id for r in page] == ["m3", "m2"]
            last = page[-1]
            rest = await store.list_messages(
                ListQuery(page_size=2, after=(last.create_time, last.id))
            )
            assert [r.id for r in rest] == ["m1"]
            by_rcpt = await store.list_messages(
                ListQuery(page_size=9, recipient="carol@example.com")
            )
            assert [r.id for r in by_rcpt] == ["m1"]
            by_caller = await store.list_messages(ListQuery(page_size=9, caller="bob"))
            assert [r.id for r in by_caller] == ["m2"]
            scheduled = await store.list_messages(ListQuery(page_size=9, status=Status.SCHEDULED))
            assert [r.id for r in scheduled] == ["m3"]
            assert await store.queue_stats(now=NOW) == {Status.QUEUED: 2, Status.SCHEDULED: 1}
            assert await store.next_due() == NOW

    run(main())


def test_claim_finish_and_lease(pg_url: str) -> None:
    async def main() -> None:
        async with opened(pg_url) as store:
            await store.insert(
                [
                    new("late", t=NOW + 5),
                    new("early", t=NOW),
                    new("future", status=Status.SCHEDULED, send_time=NOW + 3600),
                    new("sent", status=Status.SENT, payload=None, transport="smtp"),
                ]
            )
            claimed = await store.claim(now=NOW + 10, limit=10, lease=60, owner="a")
            assert [(c.id, c.attempts, c.payload) for c in claimed] == [
                ("early", 1, b"mail early"),
                ("late", 1, b"mail late"),
            ]
            assert claimed[0].lease_until == NOW + 70
            # Leased: nobody else gets them until the lease runs out.
            assert await store.claim(now=NOW + 20, limit=10, lease=60, owner="b") == []
            record = await store.get("early")
            assert record is not None and record.status == Status.SENDING

            sent = Finish(status=Status.SENT, transport="smtp", message_id="<x@smtp>")
            assert await store.finish("early", sent, owner="b", now=NOW + 21) is None
            event = await store.finish("early", sent, owner="a", now=NOW + 21)
            assert event is not None and event.status == Status.SENT
            record = await store.get("early")
            assert record is not None
            assert (record.status, record.transport, record.message_id) == (
                Status.SENT,
                "smtp",
                "<x@smtp>",
            )

            retry = Finish(
                status=Status.QUEUED,
                error="smtp: 451 later",
                reason="SMTP_UNAVAILABLE",
                detail="next attempt soon",
                next_attempt_time=NOW + 100,
            )
            assert await store.finish("late", retry, owner="a", now=NOW + 22) is not None
            record = await store.get("late")
            assert record is not None
            assert (record.status, record.next_attempt_time, record.last_error_reason) == (
                Status.QUEUED,
                NOW + 100,
                "SMTP_UNAVAILABLE",
            )
            assert await store.claim(now=NOW + 99, limit=10, lease=60, owner="a") == []
            again = await store.claim(now=NOW + 100, limit=10, lease=5, owner="a")
            assert [(c.id, c.attempts) for c in again] == [("late", 2)]
            # The lease ran out without a finish: another owner takes it over.
            taken = await store.claim(now=NOW + 106, limit=10, lease=60, owner="b")
            assert [(c.id, c.attempts) for c in taken] == [("late", 3)]
            assert await store.finish("late", sent, owner="a", now=NOW + 107) is None
            assert await store.finish("late", sent, owner="b", now=NOW + 107) is not None
            assert await store.oldest_due(now=NOW + 107) is None
            assert await store.next_due() == NOW + 3600

    run(main())


def test_cancel(pg_url: str) -> None:
    async def main() -> None:
        async with opened(pg_url) as store:
            await store.insert([new("q"), new("s", status=Status.SENT, payload=None)])
            record, event = await store.cancel("q", now=NOW + 1)
            assert record is not None and record.status == Status.CANCELLED
            assert event is not None and event.status == Status.CANCELLED
            record, event = await store.cancel("s", now=NOW + 1)
            assert record is not None and record.status == Status.SENT and event is None
            assert await store.cancel("missing", now=NOW) == (None, None)
            assert await store.claim(now=NOW + 5, limit=5, lease=60, owner="a") == []

    run(main())


def test_add_event_matches_provider_id_or_header(pg_url: str) -> None:
    async def main() -> None:
        async with opened(pg_url) as store:
            await store.insert(
                [new("a", status=Status.SENT, payload=None, message_id="<mg-1@mailgun.org>")]
            )
            event = await store.add_event(
                "mg-1@mailgun.org", Status.DELIVERED, "delivered", now=NOW
            )
            assert event is not None and (event.message_id, event.status) == ("a", Status.DELIVERED)
            event = await store.add_event("<a@mailsvc>", None, "opened", now=NOW + 1)
            assert event is not None and event.status == Status.DELIVERED
            assert await store.add_event("other@x", Status.BOUNCED, "", now=NOW) is None
            record = await store.get("a")
            assert record is not None
            assert [e.detail for e in record.events] == ["accepted", "delivered", "opened"]

    run(main())


def test_idempotency(pg_url: str) -> None:
    async def main() -> None:
        async with opened(pg_url) as store:
            reserve = store.idempotency_reserve
            assert await reserve("c", "k", "fp", now=NOW, lease_until=NOW + 60) is None
            entry = await reserve("c", "k", "fp2", now=NOW, lease_until=NOW + 60)
            assert entry is not None and (entry.fingerprint, entry.response) == ("fp", None)
            await store.idempotency_complete("c", "k", b"response", now=NOW)
            entry = await reserve("c", "k", "fp", now=NOW, lease_until=NOW + 60)
            assert entry is not None and entry.response == b"response"
            # Expired (24 hours after the response): the key is free again.
            later = NOW + 86401
            assert await reserve("c", "k", "fp3", now=later, lease_until=later + 60) is None
            await store.idempotency_release("c", "k", lease_until=later + 60)
            assert await reserve("c", "k", "fp4", now=NOW, lease_until=NOW + 60) is None
            # Stored with the records it created, in one transaction.
            await store.insert([new("m")], idempotency=("c", "k", "fp4", b"queued m"))
            entry = await reserve("c", "k", "fp4", now=NOW, lease_until=NOW + 60)
            assert entry is not None and entry.response == b"queued m"

            # Many callers at once with the same key: exactly one reserves it.
            results = await asyncio.gather(
                *(reserve("c", "race", "f", now=NOW, lease_until=NOW + 60) for _ in range(20))
            )
            assert sum(r is None for r in results) == 1

    run(main())


def test_suppressions_tokens_and_purge(pg_url: str) -> None:
    async def main() -> None:
        async with opened(pg_url) as store:
            for address in ("b@x.org", "a@x.org", "c@x.org"):
                await store.add_suppression(
                    Suppression(address=address, reason=1, create_time=NOW, detail="bounce")
                )
            assert await store.suppressed(["a@x.org", "z@x.org"]) == {"a@x.org"}
            page = await store.list_suppressions(page_size=2)
            assert [s.address for s in page] == ["a@x.org", "b@x.org"]
            page = await store.list_suppressions(page_size=2, after="b@x.org")
            assert [s.address for s in page] == ["c@x.org"]
            assert await store.delete_suppression("a@x.org") is True
            assert await store.delete_suppression("a@x.org") is False

            assert await store.remember_token("t", now=NOW, ttl=300) is True
            assert await store.remember_token("t", now=NOW + 1, ttl=300) is False
            assert await store.remember_token("t", now=NOW + 301, ttl=300) is True

            await store.insert(
                [
                    new("old", status=Status.SENT, payload=None, t=NOW),
                    new("old-queued", t=NOW),
                    new("new", status=Status.SENT, payload=None, t=NOW + 1000),
                ]
            )
            assert await store.purge(before=NOW + 500, now=NOW + 500) == 1
            assert await store.get("old") is None
            assert await store.get("old-queued") is not None

    run(main())


def test_quota_counts_and_refuses(pg_url: str) -> None:
    async def main() -> None:
        async with opened(pg_url) as store:

            async def take(n: int, at: float) -> Any:
                return await store.consume_quota("c", n, now=at, per_minute=5, per_day=8)

            first = await take(3, NOW)
            assert (first.allowed, first.minute_count, first.day_count) == (True, 3, 3)
            second = await take(2, NOW + 10)
            assert (second.allowed, second.minute_count) == (True, 5)
            refused = await take(1, NOW + 20)
            assert (refused.allowed, refused.minute_count, refused.day_count) == (False, 5, 5)
            assert refused.retry_after == pytest.approx(40)
            later = await take(3, NOW + 61)
            assert (later.allowed, later.minute_count, later.day_count) == (True, 5, 8)
            day_full = await take(1, NOW + 200)
            assert not day_full.allowed and day_full.retry_after is not None
            assert await take(9, NOW + 300) == await take(9, NOW + 300)  # never fits
            assert (await take(9, NOW + 300)).retry_after is None
            # No limit: always counted.
            free = await store.consume_quota("d", 100, now=NOW, per_minute=0, per_day=0)
            assert free.allowed and free.day_count == 100

    run(main())


# --- several instances on one database


def test_five_instances_create_the_schema_at_once(pg_url: str) -> None:
    async def main() -> None:
        stores = [PostgresStorage(pg_url, pool_size=2) for _ in range(5)]
        await asyncio.gather(*(s.open() for s in stores))
        try:
            await stores[0].insert([new("m")])
            for store in stores:
                assert await store.get("m") is not None
        finally:
            await asyncio.gather(*(s.aclose() for s in stores))
        conn = await asyncpg.connect(pg_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM schema_version") == 1
        finally:
            await conn.close()

    run(main())


def test_three_claimers_take_300_messages_exactly_once(pg_url: str) -> None:
    async def main() -> None:
        async with (
            opened(pg_url, pool_size=4) as a,
            opened(pg_url, pool_size=4) as b,
            opened(pg_url, pool_size=4) as c,
        ):
            await a.insert([new(f"m{i:03}", t=NOW + i / 1000) for i in range(300)])
            taken: dict[str, list[str]] = {"a": [], "b": [], "c": []}

            async def worker(store: PostgresStorage, owner: str) -> None:
                while True:
                    got = await store.claim(now=NOW + 10, limit=7, lease=60, owner=owner)
                    if not got:
                        return
                    taken[owner].extend(c.id for c in got)
                    for claimed in got:
                        done = Finish(status=Status.SENT, transport="smtp", message_id="x")
                        assert await store.finish(claimed.id, done, owner=owner, now=NOW + 11)

            # Two workers per instance, so claims also race inside one process.
            await asyncio.gather(
                *(worker(s, o) for s, o in ((a, "a"), (b, "b"), (c, "c")) for _ in range(2))
            )
            everything = taken["a"] + taken["b"] + taken["c"]
            assert sorted(everything) == [f"m{i:03}" for i in range(300)]
            assert all(taken.values()), {k: len(v) for k, v in taken.items()}
            assert await a.queue_stats(now=NOW) == {Status.SENT: 300}

    run(main())


def test_quota_and_idempotency_hold_across_instances(pg_url: str) -> None:
    async def main() -> None:
        async with opened(pg_url, pool_size=5) as a, opened(pg_url, pool_size=5) as b:
            results = await asyncio.gather(
                *(
                    store.consume_quota("c", 1, now=NOW, per_minute=10, per_day=0)
                    for store in (a, b)
                    for _ in range(15)
                )
            )
            assert sum(r.allowed for r in results) == 10
            final = await a.consume_quota("c", 1, now=NOW, per_minute=10, per_day=0)
            assert not final.allowed and final.minute_count == 10

            reserved = await asyncio.gather(
                *(
                    store.idempotency_reserve("c", "k", "fp", now=NOW, lease_until=NOW + 60)
                    for store in (a, b)
                    for _ in range(10)
                )
            )
            assert sum(r is None for r in reserved) == 1

    run(main())


CLAIMER = textwrap.dedent(
    """
    import asyncio, sys
    from mailsvc.storage.postgres import PostgresStorage

    async def main():
        store = PostgresStorage(sys.argv[1])
        await store.open()
        got = await store.claim(now=float(sys.argv[2]), limit=10, lease=1.0, owner="doomed")
        print(",".join(c.id for c in got), flush=True)
        await asyncio.sleep(3600)  # "sending" until killed

    asyncio.run(main())
    """
)


def test_a_killed_claimers_lease_is_taken_over(pg_url: str, tmp_path: Path) -> None:
    script = tmp_path / "claimer.py"
    script.write_text(CLAIMER)

    async def main() -> None:
        async with opened(pg_url) as store:
            await store.insert([new("a"), new("b")])
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(script), pg_url, str(NOW + 1), stdout=subprocess.PIPE
            )
            try:
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), 20)
                assert sorted(line.decode().strip().split(",")) == ["a", "b"]
            finally:
                proc.kill()
                await proc.wait()
            # Within the lease nothing is free; once it ran out, the survivor takes both.
            assert await store.claim(now=NOW + 1.5, limit=10, lease=60, owner="alive") == []
            taken = await store.claim(now=NOW + 2.1, limit=10, lease=60, owner="alive")
            assert sorted((c.id, c.attempts) for c in taken) == [("a", 2), ("b", 2)]
            sent = Finish(status=Status.SENT, transport="smtp", message_id="x")
            assert await store.finish("a", sent, owner="alive", now=NOW + 3) is not None

    run(main())


def test_events_are_seen_across_instances(pg_url: str) -> None:
    async def main() -> None:
        async with opened(pg_url) as writer, opened(pg_url) as watcher:
            feed = watcher.events()
            own = writer.events()
            await writer.insert([new("m1"), new("m2")])
            claimed = await writer.claim(now=NOW, limit=1, lease=60, owner="w")
            sent = Finish(status=Status.SENT, transport="smtp", message_id="x", detail="250 ok")
            await writer.finish(claimed[0].id, sent, owner="w", now=NOW + 1)
            for it in (feed, own):
                got = await next_events(it, 4)
                assert [(e.message_id, e.status) for e in got] == [
                    ("m1", Status.QUEUED),
                    ("m2", Status.QUEUED),
                    ("m1", Status.SENDING),
                    ("m1", Status.SENT),
                ]
                assert got[3].detail == "250 ok" and got[3].caller == "alice"
            # A large batch is announced in several notifications, every event once.
            await writer.insert([new(f"b{i}", detail="x" * 3000) for i in range(10)])
            got = await next_events(feed, 10)
            assert [e.message_id for e in got] == [f"b{i}" for i in range(10)]
            await feed.aclose()  # type: ignore[attr-defined]
            with pytest.raises(StopAsyncIteration):
                await anext(feed)

    run(main())


# --- a database that is not there, or goes away


def test_unreachable_database_names_host_and_port_not_the_password() -> None:
    port = pg._free_port()
    url = f"postgresql://mailer:Sup3rS3cret@127.0.0.1:{port}/mail"

    async def main() -> None:
        store = PostgresStorage(url, connect_timeout=3)
        with pytest.raises(StorageError) as err:
            await store.open()
        message = str(err.value)
        assert f"127.0.0.1:{port}" in message and "Sup3rS3cret" not in message
        assert "Sup3rS3cret" not in repr(err.value.__cause__) + repr(err.value.__context__)

    run(main())


def test_wrong_password_is_a_clear_error(pg_server: pg.PgServer) -> None:
    url = pg_server.url(password="Wr0ngPassw0rd")

    async def main() -> None:
        with pytest.raises(StorageError) as err:
            await PostgresStorage(url).open()
        assert "password authentication failed" in str(err.value)
        assert "Wr0ngPassw0rd" not in str(err.value)

    run(main())


async def until(check: Callable[[], Awaitable[T]], timeout: float = 20) -> T:
    """Call `check` until it stops raising StorageError; its result."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await check()
        except StorageError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def test_database_restart_fails_calls_then_recovers(own_server: pg.PgServer) -> None:
    url = own_server.create_database()

    async def main() -> None:
        async with opened(url, connect_timeout=2, listen_retry=0.2) as store:
            feed = store.events()
            await store.insert([new("before")])
            assert len(await next_events(feed, 1)) == 1

            await asyncio.to_thread(own_server.stop)
            with pytest.raises(StorageError) as err:
                await store.get("before")
            assert f"127.0.0.1:{own_server.port}" in str(err.value)
            assert own_server.password not in str(err.value)
            with pytest.raises(StorageError):
                await store.insert([new("while-down")])

            await asyncio.to_thread(own_server.start)
            record = await until(lambda: store.get("before"))
            assert record is not None
            # Every pooled connection died with the server: none of them is handed out.
            for _ in range(12):
                await store.queue_stats(now=NOW)
            await store.insert([new("after")])
            # The listener reconnected: events written after the restart still arrive
            # (possibly after the one written before, replayed once from the table).
            deadline = time.monotonic() + 10
            seen: list[str] = []
            while "after" not in seen and time.monotonic() < deadline:
                seen += [e.message_id for e in await next_events(feed, 1, timeout=10)]
            assert "after" in seen

    run(main())
