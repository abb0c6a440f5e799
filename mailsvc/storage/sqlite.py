"""The embedded store: one SQLite file in the data dir, owned by one thread of one process.

Every statement runs on a dedicated thread that owns the connection, never on the event loop.
Writes from many callers are committed together (group commit): the thread takes every job
queued while the previous commit was syncing, runs each in a savepoint of one transaction and
commits once; each caller's await returns only after that commit. Plain inserts next to each
other in a batch share their statements (one multi-row INSERT per table): Python's sqlite3
hands the GIL over at every statement, and waiting to get it back from the busy event loop
was most of the thread's time (see _merged_inserts). Under load (the last commit held several
inserts) a write waits COMMIT_DELAY for others before the thread begins: fewer, larger
commits (PostgreSQL's commit_delay), each fsync and GIL hand-over shared by more callers; at
low load a write is committed at once. WAL with synchronous=FULL:
the WAL is fsynced at every commit, so an accepted mail survives kill -9 and power loss.
One kind of write is exempt: the record of a mail already handed over (insert_history: a
synchronous send without an idempotency key) is history, not a promise. Its caller does not wait
for it: such records are gathered on the event loop for up to HISTORY_LINGER and handed to the
thread as one job, earlier if any other job comes (so every later read sees them), and a batch
of nothing else is committed with synchronous=NORMAL. A commit of its own per record that
the reply waited for cost about 100 µs of server CPU per send (bench, SendMail at 16).
A kill -9 within those milliseconds, or a power loss before the next fsynced commit, may take
such records; never a queued mail or an idempotency key.

The file is held by one process at a time (a lock file next to it), so at open any SENDING row
is a leftover of a previous process that died mid-attempt: it is re-queued, due at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

from mailsvc.storage.base import (
    CANCELLABLE,
    PENDING,
    Claimed,
    Event,
    Finish,
    IdempotencyEntry,
    ListQuery,
    MessageRecord,
    NewMessage,
    QuotaResult,
    Status,
    StorageError,
    StorageOpenError,
    Suppression,
    check_history,
)
from mailsvc.watch import Broadcaster, Subscription

log = logging.getLogger(__name__)

T = TypeVar("T")
FILE_NAME = "mailsvc.sqlite3"
SCHEMA_VERSION = 1
IDEMPOTENCY_TTL = 24 * 3600.0  # how long a stored response is kept
MAX_BATCH = 512  # jobs per group commit
HISTORY_LINGER = 0.005  # seconds a batch of history records waits for more
COMMIT_DELAY = 0.003  # seconds a write waits for others under load (see the module docstring)
DAY = 86400

_SCHEMA = """
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    caller TEXT NOT NULL,
    status INTEGER NOT NULL,
    to_addrs TEXT NOT NULL,
    cc_addrs TEXT NOT NULL,
    bcc_addrs TEXT NOT NULL,
    subject TEXT NOT NULL,
    template_name TEXT NOT NULL,
    transport TEXT NOT NULL,
    message_id TEXT NOT NULL,
    header_message_id TEXT NOT NULL,
    create_time REAL NOT NULL,
    send_time REAL NOT NULL,
    update_time REAL NOT NULL,
    next_attempt_time REAL,
    due REAL,  -- when a worker may claim it: send or next attempt time, or lease end
    attempts INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    last_error_reason TEXT NOT NULL,
    suppressed TEXT NOT NULL,
    lease_owner TEXT,
    lease_until REAL
);
CREATE INDEX messages_newest ON messages (create_time, id);
CREATE INDEX messages_caller ON messages (caller, create_time, id);
CREATE INDEX messages_status ON messages (status, create_time, id);
CREATE INDEX messages_due ON messages (due) WHERE due IS NOT NULL;
CREATE INDEX messages_updated ON messages (update_time);
CREATE INDEX messages_transport_id ON messages (message_id) WHERE message_id != '';
CREATE INDEX messages_header_id ON messages (header_message_id) WHERE header_message_id != '';
CREATE TABLE payloads (seq INTEGER PRIMARY KEY, data BLOB NOT NULL);
-- create_time and id are repeated so a recipient's page is read in order from the index
CREATE TABLE recipients (
    address TEXT NOT NULL,
    create_time REAL NOT NULL,
    id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (address, create_time, id)
) WITHOUT ROWID;
CREATE INDEX recipients_seq ON recipients (seq);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY,
    message_seq INTEGER NOT NULL,
    time REAL NOT NULL,
    status INTEGER NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX events_message ON events (message_seq, seq);
CREATE TABLE idempotency (
    caller TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    response BLOB,
    expires REAL NOT NULL,
    PRIMARY KEY (caller, key)
) WITHOUT ROWID;
CREATE INDEX idempotency_expires ON idempotency (expires);
CREATE TABLE suppressions (
    address TEXT PRIMARY KEY,
    reason INTEGER NOT NULL,
    create_time REAL NOT NULL,
    detail TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE quota_minute (
    caller TEXT NOT NULL, second INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (caller, second)
) WITHOUT ROWID;
CREATE TABLE quota_day (
    caller TEXT NOT NULL, day INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (caller, day)
) WITHOUT ROWID;
CREATE TABLE webhook_tokens (token TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;
"""

_RECORD_COLUMNS = (
    "seq, id, caller, status, to_addrs, cc_addrs, bcc_addrs, subject, template_name, "
    "transport, message_id, header_message_id, create_time, send_time, update_time, "
    "next_attempt_time, attempts, last_error, last_error_reason, suppressed"
)


_EMPTY = "[]"
# A plain addr-spec, which getaddresses would return unchanged (checked against it by a test).
_PLAIN = re.compile(r"[a-z0-9_%+-]+(?:\.[a-z0-9_%+-]+)*@[a-z0-9-]+(?:\.[a-z0-9-]+)*")


# json.dumps with options builds an encoder per call: one, built once.
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _addrs(values: Sequence[str]) -> str:
    if not values:
        return _EMPTY  # most cc, bcc and suppressed lists
    if len(values) == 1:
        value = values[0]
        # Nothing JSON would escape (quotes, backslashes, control characters): as it encodes.
        if value.isprintable() and '"' not in value and "\\" not in value:
            return f'["{value}"]'
    return _ENCODE(list(values))


def _addr_list(text: str) -> tuple[str, ...]:
    if text == _EMPTY:
        return ()
    # One address without escapes (the usual case): what json.loads gives, 10x cheaper.
    inner = text[2:-2]
    if text[:2] == '["' and text[-2:] == '"]' and '"' not in inner and "\\" not in inner:
        return (inner,)
    return tuple(json.loads(text))


_STATUS = {int(s): s for s in Status}
_new = object.__new__


def _index_addresses(values: Sequence[str]) -> set[str]:
    """Lower-cased forms a recipient filter may name: the addr-spec, and the text as given."""
    out = set()
    for value in values:
        given = value.strip().lower()
        out.add(given)
        if _PLAIN.fullmatch(given):
            continue  # parsing would give `given` again (the usual case)
        for _, addr in getaddresses([value]):
            if addr:
                out.add(addr.lower())
    return out


def _record(row: sqlite3.Row | tuple[Any, ...], events: tuple[Event, ...] = ()) -> MessageRecord:
    # What MessageRecord(...) makes, without its frozen __init__'s object.__setattr__ per field
    # (3.9 -> 1.1 us per record; a page of ListMessages reads 51).
    record: MessageRecord = _new(MessageRecord)
    record.__dict__.update(
        id=row[1],
        caller=row[2],
        status=_STATUS[row[3]],
        to=_addr_list(row[4]),
        cc=_addr_list(row[5]),
        bcc=_addr_list(row[6]),
        subject=row[7],
        template_name=row[8],
        transport=row[9],
        message_id=row[10],
        create_time=row[12],
        send_time=row[13],
        update_time=row[14],
        next_attempt_time=row[15],
        attempts=row[16],
        last_error=row[17],
        last_error_reason=row[18],
        suppressed=_addr_list(row[19]),
        events=events,
    )
    return record


@dataclass
class _Tx:
    """What a write job sees: the connection, and where to put the events it writes."""

    conn: sqlite3.Connection
    events: list[Event] = field(default_factory=list)

    def event(
        self, seq: int, id: str, caller: str, now: float, status: Status, detail: str
    ) -> Event:
        self.conn.execute(
            "INSERT INTO events (message_seq, time, status, detail) VALUES (?, ?, ?, ?)",
            (seq, now, int(status), detail),
        )
        event = Event(message_id=id, time=now, status=status, detail=detail, caller=caller)
        self.events.append(event)
        return event


@dataclass
class _Job:
    fn: Callable[[Any], Any]  # takes a _Tx (writes) or a Connection (reads)
    write: bool
    future: asyncio.Future[Any] | None  # None: history, nobody waits (see the module docstring)
    # Set when fn only inserts these records: such jobs in a row share their statements.
    records: Sequence[NewMessage] | None = None
    outcome: tuple[bool, Any] = (False, None)  # (ok, result or exception)
    events: list[Event] = field(default_factory=list)


class SqliteStorage:
    """Storage on one SQLite file; see the module docstring for the threading and durability."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hub: Broadcaster[Event] = Broadcaster()
        self._lock_fd: int | None = None
        self._closing = False
        self._history: list[NewMessage] = []  # see insert_history
        self._history_timer: asyncio.TimerHandle | None = None

    # --- the thread

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closing = False
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="mailsvc-sqlite", daemon=True
        )
        self._thread.start()
        try:
            await ready
        except BaseException:
            self._thread.join()
            self._thread = None
            raise

    def _settle(self, future: asyncio.Future[Any] | None, ok: bool, value: Any) -> None:
        if future is None:
            if not ok:
                log.error("%s: records of mails already sent were not kept: %s", self.path, value)
            return
        if future.done():
            return  # the caller went away; a write it asked for is still done
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def _run(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            conn = self._connect()
        except BaseException as exc:
            self._release_lock()
            self._loop.call_soon_threadsafe(self._settle, ready, False, exc)
            return
        self._loop.call_soon_threadsafe(self._settle, ready, True, None)
        try:
            self._serve(conn)
        finally:
            conn.close()
            self._release_lock()

    def _serve(self, conn: sqlite3.Connection) -> None:
        assert self._loop is not None
        stop = False
        durable = True  # as _prepare left the connection: synchronous=FULL
        shared = False  # the last group commit held several callers' inserts: under load
        while not stop:
            first = self._jobs.get()
            if first is None:
                break
            if shared and first.write:
                time.sleep(COMMIT_DELAY)  # let more writes join this commit
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            try:
                # Writes first: a read queued after a write (a GetMessage after the send that
                # recorded it) must see it, even when both are in this batch.
                writes = [job for job in batch if job.write]
                # Inserts, not the queue's claims and outcomes: with one caller at a time,
                # its insert and the workers' writes meet in one commit, and must not wait.
                shared = sum(job.records is not None for job in writes) > 1
                if writes:
                    needed = any(job.future is not None for job in writes)
                    if needed != durable:
                        conn.execute(f"PRAGMA synchronous = {'FULL' if needed else 'NORMAL'}")
                        durable = needed
                    self._write(conn, writes)
                for job in batch:
                    if not job.write:
                        self._read(conn, job)
            except Exception as exc:  # a bug here must not leave callers waiting forever
                log.exception("%s: the store's thread failed a batch", self.path)
                with contextlib.suppress(sqlite3.Error):
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                for job in batch:
                    job.outcome = (False, StorageError(f"internal error in the store: {exc!r}"))
                    job.events = []
            self._loop.call_soon_threadsafe(self._deliver, batch)

    def _deliver(self, batch: list[_Job]) -> None:
        for job in batch:
            for event in job.events:
                self._hub.publish(event)
            self._settle(job.future, *job.outcome)

    @staticmethod
    def _read(conn: sqlite3.Connection, job: _Job) -> None:
        try:
            job.outcome = (True, job.fn(conn))
        except sqlite3.Error as exc:
            job.outcome = (False, _storage_error("read", exc))
        except Exception as exc:
            job.outcome = (False, exc)

    def _write(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        # A job alone in its transaction needs no savepoint: the rollback undoes just it.
        alone = len(jobs) == 1
        try:
            conn.execute("BEGIN IMMEDIATE")
            done = 0
            while done < len(jobs):
                merged = _merged_inserts(conn, jobs, done)
                if merged:
                    done += merged
                    continue
                _write_one(conn, jobs[done], alone=alone)
                done += 1
            if conn.in_transaction:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # Disk full, I/O error: nothing of this batch is kept, and every caller hears it.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            error = _storage_error("write", exc)
            log.error("%s: %s", self.path, error)
            for job in jobs:
                job.outcome = (False, error)
                job.events = []

    def _check_open(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._thread is None or self._closing:
            raise StorageError("the store is not open")
        return self._loop

    async def _call(
        self,
        fn: Callable[[Any], T],
        *,
        write: bool,
        records: Sequence[NewMessage] | None = None,
    ) -> T:
        future: asyncio.Future[T] = self._check_open().create_future()
        self._hand_over_history()  # queued first, so this job sees them
        self._jobs.put(_Job(fn, write, future, records))
        return await future

    def _hand_over_history(self) -> None:
        if self._history_timer is not None:
            self._history_timer.cancel()
            self._history_timer = None
        if self._history:
            records, self._history = self._history, []
            self._jobs.put(_Job(self._inserting(records, None), True, None, records))

    async def _reading(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._call(fn, write=False)

    async def _writing(self, fn: Callable[[_Tx], T]) -> T:
        return await self._call(fn, write=True)

    async def aclose(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._hand_over_history()
        self._closing = True
        self._jobs.put(None)
        await asyncio.to_thread(thread.join)
        self._thread = None
        self._hub.close()

    # --- opening

    def _take_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageOpenError(f"{lock_path}: cannot open: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StorageOpenError(
                f"{self.path}: in use by another mailsvc process (lock {lock_path})"
            ) from exc
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _connect(self) -> sqlite3.Connection:
        path = self.path
        if path.is_dir():
            raise StorageOpenError(f"{path}: is a directory, not a database file")
        self._take_lock()
        created = not path.exists()
        try:
            # Created 0600 before SQLite sees it: its WAL and shm files take the same mode.
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            os.chmod(path, 0o600)
        except OSError as exc:
            raise StorageOpenError(f"{path}: cannot open for writing: {exc.strerror}") from exc
        if created:
            _fsync_dir(path.parent)
        try:
            conn = sqlite3.connect(
                f"file:{path}?mode=rw", uri=True, isolation_level=None, check_same_thread=True
            )
        except sqlite3.Error as exc:
            raise StorageOpenError(f"{path}: cannot open: {exc}") from exc
        try:
            self._prepare(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            name = getattr(exc, "sqlite_errorname", "")
            if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN")):
                # The file is fine; it (or its directory, for the journal) is not writable.
                raise StorageOpenError(
                    f"{path}: cannot write it or its journal in {path.parent}: {exc}"
                ) from exc
            raise StorageOpenError(f"{path}: not a usable mailsvc database: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA busy_timeout = 5000")
        # Reading the schema is where a file that is not a database (or a damaged header)
        # shows; a damaged page deeper in shows in quick_check, which reads every page once
        # (about 2 ms per MB): a start refused now beats a queue that fails mail by mail.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if version > SCHEMA_VERSION:
            raise StorageOpenError(
                f"{self.path}: schema version {version} is newer than this mailsvc "
                f"understands ({SCHEMA_VERSION})"
            )
        problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(2)")]
        if problems != ["ok"]:
            lines = [line for p in problems for line in p.splitlines() if "***" not in line]
            first = lines[0] if lines else "damaged"
            raise StorageOpenError(f"{self.path}: the database is damaged: {first[:200]}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StorageOpenError(f"{self.path}: cannot use write-ahead logging")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("BEGIN IMMEDIATE")
        try:
            if version == 0:
                for statement in _statements(_SCHEMA):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._recover(conn)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        if not os.access(self.path, os.W_OK):
            raise StorageOpenError(f"{self.path}: not writable")

    def _recover(self, conn: sqlite3.Connection) -> None:
        """Undo what a previous process left half done: it held the lock, so it is gone."""
        now = _now()
        rows = conn.execute(
            "SELECT seq, id, caller FROM messages WHERE status = ?", (int(Status.SENDING),)
        ).fetchall()
        for seq, _id, _caller in rows:
            conn.execute(
                "UPDATE messages SET status = ?, due = ?, lease_owner = NULL, lease_until = NULL, "
                "update_time = ? WHERE seq = ?",
                (int(Status.QUEUED), now, now, seq),
            )
            conn.execute(
                "INSERT INTO events (message_seq, time, status, detail) VALUES (?, ?, ?, ?)",
                (seq, now, int(Status.QUEUED), "re-queued: the service stopped during an attempt"),
            )
        if rows:
            log.warning("re-queued %d messages whose attempt a stopped process left", len(rows))
        # A reservation whose request was in flight in the dead process would block repeats.
        conn.execute("DELETE FROM idempotency WHERE response IS NULL")

    # --- message records and the queue

    async def insert(
        self,
        messages: Sequence[NewMessage],
        *,
        idempotency: tuple[str, str, str, bytes] | None = None,
    ) -> None:
        _check_payloads(messages)
        job = self._inserting(messages, idempotency)
        await self._call(job, write=True, records=None if idempotency else messages)

    @staticmethod
    def _inserting(
        messages: Sequence[NewMessage], idempotency: tuple[str, str, str, bytes] | None
    ) -> Callable[[_Tx], None]:
        def job(tx: _Tx) -> None:
            conn = tx.conn
            tx.events.extend(_insert_messages(conn, messages))
            if idempotency is not None:
                caller, key, fp, response = idempotency
                now = messages[0].create_time if messages else _now()
                updated = conn.execute(
                    "UPDATE idempotency SET fingerprint = ?, response = ?, expires = ? "
                    "WHERE caller = ? AND key = ?",
                    (fp, response, now + IDEMPOTENCY_TTL, caller, key),
                ).rowcount
                if not updated:
                    conn.execute(
                        "INSERT INTO idempotency VALUES (?, ?, ?, ?, ?)",
                        (caller, key, fp, response, now + IDEMPOTENCY_TTL),
                    )

        return job

    async def insert_history(self, messages: Sequence[NewMessage]) -> None:
        check_history(messages)
        loop = self._check_open()
        self._history.extend(messages)
        if self._history_timer is None:
            self._history_timer = loop.call_later(HISTORY_LINGER, self._hand_over_history)

    async def claim(self, *, now: float, limit: int, lease: float, owner: str) -> list[Claimed]:
        def job(tx: _Tx) -> list[Claimed]:
            conn = tx.conn
            rows = conn.execute(
                "SELECT m.seq, m.id, m.caller, m.header_message_id, m.send_time, m.attempts, "
                "p.data FROM messages m INDEXED BY messages_due "
                "JOIN payloads p ON p.seq = m.seq "
                "WHERE m.due IS NOT NULL AND m.due <= ? ORDER BY m.due LIMIT ?",
                (now, limit),
            ).fetchall()
            until = now + lease
            out = []
            for seq, id_, caller, header_id, send_time, attempts, data in rows:
                conn.execute(
                    "UPDATE messages SET status = ?, attempts = ?, lease_owner = ?, "
                    "lease_until = ?, due = ?, next_attempt_time = NULL, update_time = ? "
                    "WHERE seq = ?",
                    (int(Status.SENDING), attempts + 1, owner, until, until, now, seq),
                )
                tx.event(seq, id_, caller, now, Status.SENDING, f"attempt {attempts + 1}")
                out.append(
                    Claimed(
                        id=id_,
                        caller=caller,
                        payload=data,
                        header_message_id=header_id,
                        send_time=send_time,
                        attempts=attempts + 1,
                        lease_until=until,
                    )
                )
            return out

        if limit <= 0:
            return []
        return await self._writing(job)

    async def finish(self, id: str, outcome: Finish, *, owner: str, now: float) -> Event | None:
        if outcome.status not in (Status.SENT, Status.FAILED, Status.QUEUED):
            raise ValueError(f"an attempt cannot end in {outcome.status.name}")
        if outcome.status is Status.QUEUED and outcome.next_attempt_time is None:
            raise ValueError("a rescheduled message needs its next attempt time")

        def job(tx: _Tx) -> Event | None:
            conn = tx.conn
            row = conn.execute(
                "SELECT seq, caller FROM messages WHERE id = ? AND status = ? AND lease_owner = ?",
                (id, int(Status.SENDING), owner),
            ).fetchone()
            if row is None:
                return None
            seq, caller = row
            final = outcome.status is not Status.QUEUED
            conn.execute(
                "UPDATE messages SET status = ?, transport = CASE WHEN ? != '' THEN ? "
                "ELSE transport END, message_id = CASE WHEN ? != '' THEN ? ELSE message_id END, "
                "last_error = ?, last_error_reason = ?, next_attempt_time = ?, due = ?, "
                "lease_owner = NULL, lease_until = NULL, update_time = ? WHERE seq = ?",
                (
                    int(outcome.status),
                    outcome.transport,
                    outcome.transport,
                    outcome.message_id,
                    outcome.message_id,
                    outcome.error,
                    outcome.reason,
                    outcome.next_attempt_time,
                    outcome.next_attempt_time,
                    now,
                    seq,
                ),
            )
            if final:
                conn.execute("DELETE FROM payloads WHERE seq = ?", (seq,))
            return tx.event(seq, id, caller, now, outcome.status, outcome.detail)

        return await self._writing(job)

    async def cancel(self, id: str, *, now: float) -> tuple[MessageRecord | None, Event | None]:
        def job(tx: _Tx) -> tuple[MessageRecord | None, Event | None]:
            conn = tx.conn
            row = conn.execute(
                "SELECT seq, caller, status FROM messages WHERE id = ?", (id,)
            ).fetchone()
            if row is None:
                return None, None
            seq, caller, status = row
            event = None
            if Status(status) in CANCELLABLE:
                conn.execute(
                    "UPDATE messages SET status = ?, due = NULL, next_attempt_time = NULL, "
                    "update_time = ? WHERE seq = ?",
                    (int(Status.CANCELLED), now, seq),
                )
                conn.execute("DELETE FROM payloads WHERE seq = ?", (seq,))
                event = tx.event(seq, id, caller, now, Status.CANCELLED, "cancelled")
            return _get(conn, id), event

        return await self._writing(job)

    async def add_event(
        self, header_message_id: str, status: Status | None, detail: str, *, now: float
    ) -> Event | None:
        if not header_message_id.strip().strip("<>"):
            return None
        return await self._writing(
            lambda tx: _add_event(tx, header_message_id, status, detail, now)
        )

    async def get(self, id: str) -> MessageRecord | None:
        return await self._reading(lambda conn: _get(conn, id))

    async def list_messages(self, query: ListQuery) -> list[MessageRecord]:
        if query.page_size <= 0:
            return []
        where: list[str] = []
        args: list[Any] = []
        if query.recipient:
            sql = f"SELECT {_prefixed('m')} FROM recipients r JOIN messages m ON m.seq = r.seq "
            where.append("r.address = ?")
            args.append(query.recipient.strip().lower())
            if query.after is not None:
                where.append("(r.create_time, r.id) < (?, ?)")
                args.extend(query.after)
            order = "r.create_time DESC, r.id DESC"
        else:
            index = "messages_newest"
            if query.caller:
                index = "messages_caller"
            elif query.status is not None:
                index = "messages_status"
            sql = f"SELECT {_prefixed('m')} FROM messages m INDEXED BY {index} "
            if query.after is not None:
                where.append("(m.create_time, m.id) < (?, ?)")
                args.extend(query.after)
            order = "m.create_time DESC, m.id DESC"
        if query.caller:
            where.append("m.caller = ?")
            args.append(query.caller)
        if query.status is not None:
            where.append("m.status = ?")
            args.append(int(query.status))
        if where:
            sql += "WHERE " + " AND ".join(where) + " "
        sql += f"ORDER BY {order} LIMIT ?"
        args.append(query.page_size)

        def read(conn: sqlite3.Connection) -> list[MessageRecord]:
            return [_record(row) for row in conn.execute(sql, args)]

        return await self._reading(read)

    async def next_due(self) -> float | None:
        def read(conn: sqlite3.Connection) -> float | None:
            value = conn.execute("SELECT min(due) FROM messages WHERE due IS NOT NULL").fetchone()[
                0
            ]
            return float(value) if value is not None else None

        return await self._reading(read)

    async def queue_stats(self, *, now: float) -> dict[Status, int]:
        def read(conn: sqlite3.Connection) -> dict[Status, int]:
            rows = conn.execute(
                "SELECT status, count(*) FROM messages INDEXED BY messages_status GROUP BY status"
            )
            return {Status(status): count for status, count in rows}

        return await self._reading(read)

    async def oldest_due(self, *, now: float) -> float | None:
        def read(conn: sqlite3.Connection) -> float | None:
            value = conn.execute(
                "SELECT min(due) FROM messages WHERE due IS NOT NULL AND due <= ? AND status != ?",
                (now, int(Status.SENDING)),
            ).fetchone()[0]
            return float(value) if value is not None else None

        return await self._reading(read)

    async def purge(self, *, before: float, now: float) -> int:
        def job(tx: _Tx) -> int:
            conn = tx.conn
            seqs = [
                seq
                for (seq,) in conn.execute(
                    "SELECT seq FROM messages WHERE update_time < ? AND due IS NULL", (before,)
                )
            ]
            for chunk in _chunks(seqs, 500):
                marks = ",".join("?" * len(chunk))
                conn.execute(f"DELETE FROM events WHERE message_seq IN ({marks})", chunk)
                conn.execute(f"DELETE FROM recipients WHERE seq IN ({marks})", chunk)
                conn.execute(f"DELETE FROM payloads WHERE seq IN ({marks})", chunk)
                conn.execute(f"DELETE FROM messages WHERE seq IN ({marks})", chunk)
            conn.execute("DELETE FROM idempotency WHERE expires <= ?", (now,))
            conn.execute("DELETE FROM webhook_tokens WHERE expires <= ?", (now,))
            conn.execute("DELETE FROM quota_minute WHERE second <= ?", (int(now) - 60,))
            conn.execute("DELETE FROM quota_day WHERE day < ?", (int(now // DAY),))
            return len(seqs)

        return await self._writing(job)

    # --- idempotency

    async def idempotency_reserve(
        self, caller: str, key: str, fingerprint: str, *, now: float, lease_until: float
    ) -> IdempotencyEntry | None:
        # `expires` is the lease's end while there is no response, then the key's end.
        def job(tx: _Tx) -> IdempotencyEntry | None:
            row = tx.conn.execute(
                "SELECT fingerprint, response, expires FROM idempotency "
                "WHERE caller = ? AND key = ?",
                (caller, key),
            ).fetchone()
            if row is not None and row[2] > now:
                return IdempotencyEntry(fingerprint=row[0], response=row[1])
            tx.conn.execute(
                "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, NULL, ?)",
                (caller, key, fingerprint, lease_until),
            )
            return None

        return await self._writing(job)

    async def idempotency_renew(
        self, caller: str, key: str, *, lease_until: float, new_until: float
    ) -> bool:
        def job(tx: _Tx) -> bool:
            return bool(
                tx.conn.execute(
                    "UPDATE idempotency SET expires = ? WHERE caller = ? AND key = ? "
                    "AND response IS NULL AND expires = ?",
                    (new_until, caller, key, lease_until),
                ).rowcount
            )

        return await self._writing(job)

    async def idempotency_complete(
        self, caller: str, key: str, response: bytes, *, now: float | None = None
    ) -> None:
        expires = (_now() if now is None else now) + IDEMPOTENCY_TTL

        def job(tx: _Tx) -> None:
            tx.conn.execute(
                "UPDATE idempotency SET response = ?, expires = ? WHERE caller = ? AND key = ?",
                (response, expires, caller, key),
            )

        await self._writing(job)

    async def idempotency_release(self, caller: str, key: str, *, lease_until: float) -> None:
        def job(tx: _Tx) -> None:
            tx.conn.execute(
                "DELETE FROM idempotency WHERE caller = ? AND key = ? AND response IS NULL "
                "AND expires = ?",
                (caller, key, lease_until),
            )

        await self._writing(job)

    # --- suppressions

    async def suppressed(self, addresses: Sequence[str]) -> set[str]:
        wanted = sorted({a.lower() for a in addresses})
        if not wanted:
            return set()

        def read(conn: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for chunk in _chunks(wanted, 500):
                marks = ",".join("?" * len(chunk))
                found.update(
                    a
                    for (a,) in conn.execute(
                        f"SELECT address FROM suppressions WHERE address IN ({marks})", chunk
                    )
                )
            return found

        return await self._reading(read)

    async def add_suppression(self, entry: Suppression) -> Suppression:
        return await self._writing(lambda tx: _add_suppression(tx, entry))

    async def delete_suppression(self, address: str) -> bool:
        def job(tx: _Tx) -> bool:
            cursor = tx.conn.execute(
                "DELETE FROM suppressions WHERE address = ?", (address.lower(),)
            )
            return cursor.rowcount > 0

        return await self._writing(job)

    async def list_suppressions(self, *, page_size: int, after: str = "") -> list[Suppression]:
        def read(conn: sqlite3.Connection) -> list[Suppression]:
            rows = conn.execute(
                "SELECT address, reason, create_time, detail FROM suppressions "
                "WHERE address > ? ORDER BY address LIMIT ?",
                (after.lower(), page_size),
            )
            return [
                Suppression(address=a, reason=r, create_time=t, detail=d) for a, r, t, d in rows
            ]

        return await self._reading(read)

    # --- rate limits

    async def consume_quota(
        self, caller: str, count: int, *, now: float, per_minute: int, per_day: int
    ) -> QuotaResult:
        second = int(now)
        day = int(now // DAY)

        def job(tx: _Tx) -> QuotaResult:
            conn = tx.conn
            buckets: list[tuple[int, int]] = []
            minute_count = day_count = 0
            if per_minute:
                buckets = conn.execute(
                    "SELECT second, count FROM quota_minute WHERE caller = ? AND second > ? "
                    "ORDER BY second",
                    (caller, second - 60),
                ).fetchall()
                minute_count = sum(c for _, c in buckets)
            if per_day:
                row = conn.execute(
                    "SELECT count FROM quota_day WHERE caller = ? AND day = ?", (caller, day)
                ).fetchone()
                day_count = row[0] if row else 0
            minute_ok = not per_minute or minute_count + count <= per_minute
            day_ok = not per_day or day_count + count <= per_day
            if not (minute_ok and day_ok):
                return QuotaResult(
                    allowed=False,
                    minute_count=minute_count,
                    day_count=day_count,
                    retry_after=_retry_after(
                        now, count, per_minute, minute_ok, buckets, per_day, day_ok
                    ),
                )
            if per_minute:
                conn.execute(
                    "INSERT INTO quota_minute VALUES (?, ?, ?) ON CONFLICT (caller, second) "
                    "DO UPDATE SET count = count + excluded.count",
                    (caller, second, count),
                )
                minute_count += count
            if per_day:
                conn.execute(
                    "INSERT INTO quota_day VALUES (?, ?, ?) ON CONFLICT (caller, day) "
                    "DO UPDATE SET count = count + excluded.count",
                    (caller, day, count),
                )
                day_count += count
            return QuotaResult(allowed=True, minute_count=minute_count, day_count=day_count)

        if not per_minute and not per_day:
            return QuotaResult(allowed=True, minute_count=0, day_count=0)
        return await self._writing(job)

    # --- webhook tokens

    async def remember_token(self, token: str, *, now: float, ttl: float) -> bool:
        return await self._writing(lambda tx: _remember_token(tx, token, now, ttl))

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
        def job(tx: _Tx) -> tuple[bool, Event | None]:
            if not _remember_token(tx, token, now, ttl):
                return False, None
            event = _add_event(tx, header_message_id, status, detail, now)
            if event is not None and suppression is not None:
                _add_suppression(tx, suppression)
            return True, event

        return await self._writing(job)

    # --- change feed

    def events(self) -> Subscription[Event]:
        return self._hub.subscribe()


def _write_one(conn: sqlite3.Connection, job: _Job, *, alone: bool) -> None:
    """Run one write job of the open transaction; its own mistake undoes only it."""
    tx = _Tx(conn)
    if not alone:
        conn.execute("SAVEPOINT job")
    try:
        result = job.fn(tx)
    except Exception as exc:
        if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
            raise  # the transaction itself may be gone: fail the batch
        # This caller's mistake (a duplicate id, a bad argument): only its job is undone,
        # the others in the batch are committed.
        if alone:
            conn.execute("ROLLBACK")
        else:
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
        if isinstance(exc, sqlite3.Error):
            exc = _storage_error("write", exc)
        job.outcome = (False, exc)
        return
    if not alone:
        conn.execute("RELEASE job")
    job.outcome = (True, result)
    job.events = tx.events


def _merged_inserts(conn: sqlite3.Connection, jobs: list[_Job], start: int) -> int:
    """Insert the records of the plain-insert jobs from `start` on together (why: the module
    docstring); how many. 0 when fewer than two such jobs are in a row, or when together
    they fail (a duplicate id): then each goes alone, and only the culprit fails."""
    end = start
    while end < len(jobs) and jobs[end].records is not None:
        end += 1
    if end - start < 2:
        return 0
    run = jobs[start:end]
    # First in its transaction, the run needs no savepoint: a rollback undoes just it.
    first = start == 0
    if not first:
        conn.execute("SAVEPOINT merged")
    try:
        events = _insert_messages(conn, [m for job in run for m in job.records or ()])
    except sqlite3.IntegrityError:
        if first:
            conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
        else:
            conn.execute("ROLLBACK TO merged")
            conn.execute("RELEASE merged")
        return 0
    if not first:
        conn.execute("RELEASE merged")
    for job in run:
        count = len(job.records or ())
        job.events, events = events[:count], events[count:]
        job.outcome = (True, None)
    return len(run)


def _check_payloads(messages: Sequence[NewMessage]) -> None:
    for m in messages:
        if m.status in PENDING and m.payload is None:
            raise ValueError(f"message {m.id}: a pending message needs its payload")


def _insert_messages(conn: sqlite3.Connection, messages: Sequence[NewMessage]) -> list[Event]:
    """Insert the records, their payloads, recipients and first events; their events."""
    if not messages:
        return []
    # seq as SQLite would give it (max + 1), given here so the other rows can name it.
    last = conn.execute("SELECT coalesce(max(seq), 0) FROM messages").fetchone()[0]
    rows: list[tuple[Any, ...]] = []
    payloads: list[tuple[int, bytes | None]] = []
    recipients: list[tuple[str, float, str, int]] = []
    event_rows: list[tuple[int, float, int, str]] = []
    events: list[Event] = []
    for seq, m in enumerate(messages, start=last + 1):
        pending = m.status in PENDING
        rows.append(
            (
                seq,
                m.id,
                m.caller,
                int(m.status),
                _addrs(m.to),
                _addrs(m.cc),
                _addrs(m.bcc),
                m.subject,
                m.template_name,
                m.transport,
                m.message_id,
                m.header_message_id,
                m.create_time,
                m.send_time,
                m.create_time,
                m.send_time if pending else None,
                0 if pending else 1,
                m.last_error,
                m.last_error_reason,
                _addrs(m.suppressed),
            )
        )
        if pending:
            payloads.append((seq, m.payload))
        recipients.extend(
            (a, m.create_time, m.id, seq) for a in _index_addresses((*m.to, *m.cc, *m.bcc))
        )
        event_rows.append((seq, m.create_time, int(m.status), m.detail))
        events.append(
            Event(
                message_id=m.id,
                time=m.create_time,
                status=m.status,
                detail=m.detail,
                caller=m.caller,
            )
        )
    _insert_rows(
        conn,
        "INSERT INTO messages (seq, id, caller, status, to_addrs, cc_addrs, bcc_addrs, "
        "subject, template_name, transport, message_id, header_message_id, create_time, "
        "send_time, update_time, due, attempts, last_error, last_error_reason, suppressed)",
        rows,
    )
    _insert_rows(conn, "INSERT INTO payloads (seq, data)", payloads)
    _insert_rows(
        conn, "INSERT OR IGNORE INTO recipients (address, create_time, id, seq)", recipients
    )
    _insert_rows(conn, "INSERT INTO events (message_seq, time, status, detail)", event_rows)
    return events


MAX_ROWS_PER_INSERT = 64  # statements of 1, 2, 4 ... 64 rows: a few shapes, all cached


def _insert_rows(conn: sqlite3.Connection, head: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """INSERT the rows with as few statements as those shapes allow (one step each)."""
    done = 0
    while done < len(rows):
        count = min(MAX_ROWS_PER_INSERT, 1 << ((len(rows) - done).bit_length() - 1))
        chunk = rows[done : done + count]
        conn.execute(_values(head, len(chunk[0]), count), list(chain.from_iterable(chunk)))
        done += count


@functools.cache
def _values(head: str, width: int, count: int) -> str:
    row = f"({', '.join('?' * width)})"
    return f"{head} VALUES {', '.join([row] * count)}"


def _add_event(
    tx: _Tx, header_message_id: str, status: Status | None, detail: str, now: float
) -> Event | None:
    bare = header_message_id.strip().strip("<>")
    if not bare:
        return None
    forms = (bare, f"<{bare}>")
    conn = tx.conn
    row = conn.execute(
        "SELECT seq, id, caller, status FROM messages WHERE message_id IN (?, ?) "
        "UNION ALL SELECT seq, id, caller, status FROM messages "
        "WHERE header_message_id IN (?, ?) ORDER BY seq DESC LIMIT 1",
        (*forms, *forms),
    ).fetchone()
    if row is None:
        return None
    seq, id_, caller, current = row
    if status is not None:
        conn.execute(
            "UPDATE messages SET status = ?, update_time = ? WHERE seq = ?",
            (int(status), now, seq),
        )
    return tx.event(seq, id_, caller, now, status or Status(current), detail)


def _add_suppression(tx: _Tx, entry: Suppression) -> Suppression:
    address = entry.address.lower()
    # A repeat updates reason and detail; the entry keeps its first create_time.
    tx.conn.execute(
        "INSERT INTO suppressions VALUES (?, ?, ?, ?) ON CONFLICT (address) DO UPDATE "
        "SET reason = excluded.reason, detail = excluded.detail",
        (address, entry.reason, entry.create_time, entry.detail),
    )
    row = tx.conn.execute(
        "SELECT address, reason, create_time, detail FROM suppressions WHERE address = ?",
        (address,),
    ).fetchone()
    return Suppression(address=row[0], reason=row[1], create_time=row[2], detail=row[3])


def _remember_token(tx: _Tx, token: str, now: float, ttl: float) -> bool:
    row = tx.conn.execute("SELECT expires FROM webhook_tokens WHERE token = ?", (token,)).fetchone()
    if row is not None and row[0] > now:
        return False
    tx.conn.execute("INSERT OR REPLACE INTO webhook_tokens VALUES (?, ?)", (token, now + ttl))
    return True


def _retry_after(
    now: float,
    count: int,
    per_minute: int,
    minute_ok: bool,
    buckets: list[tuple[int, int]],
    per_day: int,
    day_ok: bool,
) -> float | None:
    """Seconds until `count` more would fit both windows; None if it never will."""
    wait = 0.0
    if not minute_ok:
        if count > per_minute:
            return None
        excess = sum(c for _, c in buckets) + count - per_minute
        for second, c in buckets:  # oldest first: each leaves the window 60 s after its second
            excess -= c
            if excess <= 0:
                wait = max(wait, second + 60 - now)
                break
    if not day_ok:
        if count > per_day:
            return None
        wait = max(wait, (int(now // DAY) + 1) * DAY - now)
    return max(wait, 0.0)


def _get(conn: sqlite3.Connection, id: str) -> MessageRecord | None:
    row = conn.execute(f"SELECT {_RECORD_COLUMNS} FROM messages WHERE id = ?", (id,)).fetchone()
    if row is None:
        return None
    events = tuple(
        Event(message_id=id, time=t, status=Status(s), detail=d, caller=row[2])
        for t, s, d in conn.execute(
            "SELECT time, status, detail FROM events WHERE message_seq = ? ORDER BY seq",
            (row[0],),
        )
    )
    return _record(row, events)


def _prefixed(alias: str) -> str:
    return ", ".join(f"{alias}.{c.strip()}" for c in _RECORD_COLUMNS.split(","))


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _statements(script: str) -> list[str]:
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _storage_error(what: str, exc: sqlite3.Error) -> StorageError:
    name = getattr(exc, "sqlite_errorname", "") or type(exc).__name__
    if name in ("SQLITE_FULL", "SQLITE_IOERR") or name.startswith("SQLITE_IOERR"):
        message = f"the database could not be written ({name}): disk full or failing"
    else:
        message = f"database {what} failed ({name})"
    error = StorageError(message)
    error.__cause__ = exc
    return error


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> float:
    return time.time()
