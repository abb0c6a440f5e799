"""The storage suite against each implementation, and what only the SQLite store promises."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from mailsvc.storage.base import ListQuery, Status, Storage, StorageError, StorageOpenError
from mailsvc.storage.postgres import PostgresStorage
from mailsvc.storage.sqlite import FILE_NAME, SqliteStorage
from tests.storage_suite import *  # noqa: F403
from tests.storage_suite import T0, new

pytestmark = pytest.mark.anyio


def make_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "sqlite":
        return SqliteStorage(tmp_path / FILE_NAME)
    if request.param == "postgres":
        return PostgresStorage(request.getfixturevalue("pg_url"))
    raise AssertionError(request.param)


# The same behaviour, run against both stores, so they cannot drift apart.
@pytest.fixture(params=["sqlite", "postgres"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    store = make_storage(request, tmp_path)
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()


# --- SQLite only


def _child(script: str, db: Path) -> subprocess.Popen[str]:
    code = (
        textwrap.dedent(
            """
        import asyncio, sys, time
        from pathlib import Path
        from mailsvc.storage.base import NewMessage, Status
        from mailsvc.storage.sqlite import SqliteStorage

        def new(i):
            now = time.time()
            return NewMessage(id=f"m{i:05d}", caller="c", status=Status.QUEUED,
                              to=("x@example.org",), create_time=now, send_time=now,
                              payload=b"p" * 100)

        async def main():
            store = SqliteStorage(Path(sys.argv[1]))
            await store.open()
        """
        )
        + textwrap.indent(textwrap.dedent(script), " " * 4)
        + "\nasyncio.run(main())\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(db)], stdout=subprocess.PIPE, text=True
    )


@asynccontextmanager
async def _opened(path: Path) -> AsyncIterator[SqliteStorage]:
    store = SqliteStorage(path)
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()


def _kill_after(child: subprocess.Popen[str], line: str) -> None:
    assert child.stdout is not None
    assert child.stdout.readline().strip() == line
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)


async def test_committed_inserts_survive_kill_9(tmp_path: Path) -> None:
    db = tmp_path / FILE_NAME
    child = _child(
        """
        await asyncio.gather(*(store.insert([new(i)]) for i in range(300)))
        print("committed", flush=True)
        # Keep writing, so the kill lands in the middle of later transactions.
        await asyncio.gather(*(store.insert([new(i)]) for i in range(300, 5000)))
        time.sleep(60)
        """,
        db,
    )
    _kill_after(child, "committed")
    async with _opened(db) as store:
        for i in range(300):
            assert await store.get(f"m{i:05d}") is not None, i
        record = await store.get("m00299")
        assert record is not None and record.status is Status.QUEUED


async def test_history_is_kept_once_a_later_call_returned_or_the_store_closed(
    tmp_path: Path,
) -> None:
    """Nobody waits for a history record, yet a call made after it (here a read) returns only
    once it is committed, so it survives kill -9 from then on; closing commits the rest."""
    db = tmp_path / FILE_NAME
    child = _child(
        """
        from dataclasses import replace
        sent = [replace(new(i), status=Status.SENT, payload=None) for i in range(200)]
        await store.insert_history(sent)
        assert await store.get("m00199") is not None
        print("read", flush=True)
        time.sleep(60)
        """,
        db,
    )
    _kill_after(child, "read")
    async with _opened(db) as store:
        for i in range(200):
            record = await store.get(f"m{i:05d}")
            assert record is not None and record.status is Status.SENT, i
        await store.insert_history([new("last", status=Status.SENT)])
    async with _opened(db) as store:
        assert await store.get("last") is not None


async def test_attempts_cut_by_a_crash_are_queued_again_at_open(tmp_path: Path) -> None:
    db = tmp_path / FILE_NAME
    child = _child(
        """
        await store.insert([new(1), new(2)])
        claimed = await store.claim(now=time.time() + 1, limit=1, lease=3600, owner="dead")
        assert len(claimed) == 1
        print("claimed", flush=True)
        time.sleep(60)
        """,
        db,
    )
    _kill_after(child, "claimed")
    async with _opened(db) as store:
        record = await store.get("m00001")
        assert record is not None and record.status is Status.QUEUED
        assert record.events[-1].status is Status.QUEUED
        assert "re-queued" in record.events[-1].detail
        # Due at once, not after the dead process's hour-long lease.
        claimed = await store.claim(now=time.time() + 1, limit=10, lease=60, owner="w")
        assert {c.id for c in claimed} == {"m00001", "m00002"}
        assert {c.attempts for c in claimed if c.id == "m00001"} == {2}


async def test_a_corrupt_file_is_refused_by_name_and_left_alone(tmp_path: Path) -> None:
    db = tmp_path / FILE_NAME
    junk = b"this is not a database " * 200
    db.write_bytes(junk)
    with pytest.raises(StorageOpenError, match=str(db)):
        await SqliteStorage(db).open()
    assert db.read_bytes() == junk


async def test_a_second_process_on_the_same_file_is_refused(tmp_path: Path) -> None:
    db = tmp_path / FILE_NAME
    first = SqliteStorage(db)
    await first.open()
    try:
        child = subprocess.run(  # noqa: ASYNC221 - the parent only waits for the refusal
            [
                sys.executable,
                "-c",
                "import asyncio, sys; from pathlib import Path;"
                "from mailsvc.storage.sqlite import SqliteStorage;"
                "asyncio.run(SqliteStorage(Path(sys.argv[1])).open())",
                str(db),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert child.returncode != 0
        assert "in use by another mailsvc process" in child.stderr and str(db) in child.stderr
    finally:
        await first.aclose()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / FILE_NAME
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StorageOpenError, match="newer"):
        await SqliteStorage(db).open()


async def test_the_database_files_are_private(tmp_path: Path) -> None:
    db = tmp_path / FILE_NAME
    async with _opened(db) as store:
        await store.insert([new("m")])
        for path in (db, Path(f"{db}-wal")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


async def test_a_full_disk_fails_the_write_and_keeps_nothing(tmp_path: Path) -> None:
    async with _opened(tmp_path / FILE_NAME) as store:
        await store.insert([new("small")])

        def cap(tx: object) -> None:  # a database that cannot grow stands in for a full disk
            conn = tx.conn  # type: ignore[attr-defined]
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages + 2}")

        await store._writing(cap)
        big = new("big", payload=os.urandom(200_000))
        results = await asyncio.gather(
            store.insert([big]), store.insert([new("with-it")]), return_exceptions=True
        )
        assert isinstance(results[0], StorageError)
        assert "disk full" in str(results[0])
        assert await store.get("big") is None
        assert await store.get("small") is not None


@pytest.mark.slow
async def test_recipient_listing_stays_fast_with_100k_records(tmp_path: Path) -> None:
    async with _opened(tmp_path / FILE_NAME) as store:
        batch = 2000
        for start in range(0, 100_000, batch):
            await store.insert(
                [
                    new(
                        f"m{i:06d}",
                        caller=f"caller{i % 50}",
                        t=T0 + i,
                        to=(f"user{i % 1000}@example.org",),
                        cc=("everyone@example.org",) if i % 2 else (),
                        status=Status.SENT,
                    )
                    for i in range(start, start + batch)
                ]
            )
        for query in (
            ListQuery(page_size=50, recipient="user7@example.org"),
            ListQuery(page_size=50, recipient="everyone@example.org", status=Status.SENT),
            ListQuery(page_size=50, recipient="everyone@example.org", caller="caller3"),
            ListQuery(page_size=50, caller="caller3", after=(T0 + 50_000, "m050000")),
            ListQuery(page_size=50, status=Status.SENT),
            ListQuery(page_size=50, status=Status.FAILED),
            ListQuery(page_size=50),
        ):
            started = time.perf_counter()
            page = await store.list_messages(query)
            took = time.perf_counter() - started
            assert took < 0.25, (query, took)
            if query.status is not Status.FAILED:
                assert len(page) == 50, query
        page = await store.list_messages(ListQuery(page_size=50, recipient="USER7@example.org"))
        assert [r.id for r in page[:2]] == ["m099007", "m098007"]
