"""PostgresStorage: the Storage interface on PostgreSQL, shared by any number of replicas.

Claims are `FOR UPDATE SKIP LOCKED` with a lease; every event row is announced with
NOTIFY in the transaction that writes it, and each process LISTENs on one connection of its
own to feed `events()`. A lost connection is retried once where a second try cannot do the
work twice; otherwise the call raises StorageError and the pool reconnects on the next call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Any, TypeVar

import asyncpg

from mailsvc.storage import pg_schema
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
from mailsvc.storage.pg_feed import (
    CONNECTION_ERRORS,
    DB_ERRORS,
    Conn,
    EventFeed,
    announcing,
    describe_url,
    event_of,
    reason,
    write_events,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
CLOSE_TIMEOUT = 5.0  # seconds
IDEMPOTENCY_TTL = 24 * 3600.0  # how long a stored response is kept

_PENDING_CODES = tuple(int(s) for s in PENDING)
_MESSAGE_COLUMNS = (
    "id, caller, status, to_addrs, cc_addrs, bcc_addrs, subject, template_name, transport, "
    "message_id, create_time, send_time, update_time, next_attempt_time, attempts, "
    "last_error, last_error_reason, suppressed"
)
# Records, their idempotency keys and first events, announced: one statement, arrays in.
# The text[] columns come as JSON lists (arrays of arrays cannot be unnested).
_INSERT = announcing(
    """
WITH r AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::smallint[], $4::text[], $5::text[],
        $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[],
        $12::text[], $13::float8[], $14::float8[], $15::float8[], $16::text[], $17::bytea[],
        $18::text[], $19::text[], $20::text[])
    WITH ORDINALITY AS r(id, caller, status, to_addrs, cc_addrs, bcc_addrs, rcpt, subject,
        template_name, transport, message_id, header_message_id, create_time, send_time,
        due_time, suppressed, payload, last_error, last_error_reason, detail, n)
), m AS (
    INSERT INTO messages (id, caller, status, to_addrs, cc_addrs, bcc_addrs, rcpt, subject,
        template_name, transport, message_id, header_message_id, create_time, send_time,
        update_time, due_time, suppressed, payload, last_error, last_error_reason)
    SELECT id, caller, status,
        ARRAY(SELECT json_array_elements_text(to_addrs::json)),
        ARRAY(SELECT json_array_elements_text(cc_addrs::json)),
        ARRAY(SELECT json_array_elements_text(bcc_addrs::json)),
        ARRAY(SELECT json_array_elements_text(rcpt::json)),
        subject, template_name, transport, message_id, header_message_id, create_time,
        send_time, create_time, due_time,
        ARRAY(SELECT json_array_elements_text(suppressed::json)),
        payload, last_error, last_error_reason
    FROM r
    RETURNING id
), k AS (
    INSERT INTO idempotency (caller, key, fingerprint, response, expire_time)
    SELECT * FROM unnest($21::text[], $22::text[], $23::text[], $24::bytea[], $25::float8[])
    ON CONFLICT (caller, key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint,
        response = EXCLUDED.response, expire_time = EXCLUDED.expire_time
), ev AS (
    INSERT INTO events (message_id, time, status, detail, caller)
    SELECT r.id, r.create_time, r.status, r.detail, r.caller FROM r JOIN m USING (id)
    ORDER BY r.n
    RETURNING seq, message_id, time, status, detail, caller
)""",
    join="ORDER BY ev.seq",
)
_CLAIM = announcing(
    """
WITH due AS (
    SELECT id FROM messages WHERE due_time <= $1
    ORDER BY due_time, id LIMIT $2
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE messages m SET status = 3, attempts = m.attempts + 1, lease_owner = $3,
        lease_until = $4, due_time = $4, update_time = $1, next_attempt_time = NULL
    FROM due WHERE m.id = due.id
    RETURNING m.id, m.caller, m.payload, m.header_message_id, m.send_time, m.attempts,
        m.lease_until, m.due_time
), ev AS (
    INSERT INTO events (message_id, time, status, detail, caller)
    SELECT id, $1, 3, 'attempt ' || attempts, caller FROM claimed ORDER BY due_time, id
    RETURNING seq, message_id, time, status, detail, caller
)""",
    select="c.id, c.caller, c.payload, c.header_message_id, c.send_time, c.attempts, "
    "c.lease_until, c.due_time",
    join="JOIN claimed c ON c.id = ev.message_id ORDER BY ev.seq",
)
_FINISH = announcing(
    """
WITH done AS (
    UPDATE messages SET status = $3::smallint, update_time = $4,
        transport = CASE WHEN $5 <> '' THEN $5 ELSE transport END,
        message_id = CASE WHEN $6 <> '' THEN $6 ELSE message_id END,
        last_error = $7, last_error_reason = $8,
        next_attempt_time = $9, due_time = $9,
        payload = CASE WHEN $3::smallint IN (4, 6) THEN NULL ELSE payload END,
        lease_owner = '', lease_until = NULL
    WHERE id = $1 AND status = 3 AND lease_owner = $2
    RETURNING id, caller
), ev AS (
    INSERT INTO events (message_id, time, status, detail, caller)
    SELECT id, $4, $3::smallint, $10, caller FROM done
    RETURNING seq, message_id, time, status, detail, caller
)"""
)


def _record(row: asyncpg.Record, events: tuple[Event, ...] = ()) -> MessageRecord:
    return MessageRecord(
        id=row["id"],
        caller=row["caller"],
        status=Status(row["status"]),
        to=tuple(row["to_addrs"]),
        cc=tuple(row["cc_addrs"]),
        bcc=tuple(row["bcc_addrs"]),
        subject=row["subject"],
        template_name=row["template_name"],
        transport=row["transport"],
        message_id=row["message_id"],
        create_time=row["create_time"],
        send_time=row["send_time"],
        update_time=row["update_time"],
        next_attempt_time=row["next_attempt_time"],
        attempts=row["attempts"],
        last_error=row["last_error"],
        last_error_reason=row["last_error_reason"],
        suppressed=tuple(row["suppressed"]),
        events=events,
    )


def _recipient_keys(values: Sequence[str]) -> list[str]:
    """Lower-cased forms a recipient filter may name: the addr-spec, and the text as given."""
    out: set[str] = set()
    for value in values:
        out.add(value.strip().lower())
        out.update(addr.lower() for _, addr in getaddresses([value]) if addr)
    return sorted(out)


MAX_INSERT_FLUSHERS = 2  # insert transactions in flight at once
MAX_INSERT_BATCH = 256  # insert calls per transaction


class _DatabaseAway(StorageError):
    """The database did not answer: every write of the moment fails alike."""


@dataclass
class _Insert:
    """One insert() call waiting for its batch."""

    messages: Sequence[NewMessage]
    idempotency: tuple[str, str, str, bytes] | None
    done: asyncio.Future[None]


async def _no_session_state(conn: asyncpg.Connection[Any]) -> None:
    """The pool's reset at each release. Ours leave no session state behind (no SET, no LISTEN
    on pooled connections, advisory locks per transaction or released), so asyncpg's reset
    query, a round trip more per call, is not sent; asyncpg still rolls back a transaction
    left open."""


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


def _insert_args(batch: list[_Insert]) -> list[list[Any]]:
    """The 25 arrays of _INSERT for these insert calls."""
    messages = [m for one in batch for m in one.messages]
    keys = [
        (*one.idempotency, one.messages[0].create_time + IDEMPOTENCY_TTL)
        for one in batch
        if one.idempotency is not None
    ]
    return [
        [m.id for m in messages],
        [m.caller for m in messages],
        [int(m.status) for m in messages],
        [_json(m.to) for m in messages],
        [_json(m.cc) for m in messages],
        [_json(m.bcc) for m in messages],
        [_json(_recipient_keys((*m.to, *m.cc, *m.bcc))) for m in messages],
        [m.subject for m in messages],
        [m.template_name for m in messages],
        [m.transport for m in messages],
        [m.message_id for m in messages],
        [m.header_message_id for m in messages],
        [m.create_time for m in messages],
        [m.send_time for m in messages],
        [m.send_time if m.status in PENDING else None for m in messages],
        [_json(m.suppressed) for m in messages],
        [m.payload if m.status in PENDING else None for m in messages],
        [m.last_error for m in messages],
        [m.last_error_reason for m in messages],
        [m.detail for m in messages],
        *([list(column) for column in zip(*keys, strict=True)] if keys else [[]] * 5),
    ]


def _json(values: Sequence[str]) -> str:
    return json.dumps(list(values), ensure_ascii=False)


class PostgresStorage:
    """The Storage Protocol on PostgreSQL (asyncpg); see base.Storage for each method."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        connect_timeout: float = 10.0,
        command_timeout: float = 30.0,
        listen_retry: float = 1.0,
    ) -> None:
        self._url = url
        self._where = describe_url(url)
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        self._inserts: list[_Insert] = []  # waiting for a flusher (see insert)
        self._flushers = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._feed = EventFeed(
            url, self._where, connect_timeout=connect_timeout, listen_retry=listen_retry
        )

    # --- lifecycle
    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                # No floor: asyncpg would restore it in the background and log a stack trace
                # at every try while the database is away; connections open on demand.
                min_size=0,
                max_size=self._pool_size,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                reset=_no_session_state,
            )
        except DB_ERRORS as exc:
            raise StorageOpenError(
                f"cannot connect to PostgreSQL at {self._where}: {reason(exc)}"
            ) from None
        try:
            conn = await self._pool.acquire()
        except DB_ERRORS as exc:
            await self._pool.close()
            raise StorageOpenError(
                f"cannot connect to PostgreSQL at {self._where}: {reason(exc)}"
            ) from None
        try:
            try:
                await pg_schema.migrate(conn)
                last_seq = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM events")
            finally:
                await self._pool.release(conn)
        except pg_schema.SchemaTooNew as exc:
            await self._pool.close()
            raise StorageOpenError(f"PostgreSQL at {self._where}: {exc}") from None
        except DB_ERRORS as exc:
            await self._pool.close()
            raise StorageOpenError(
                f"cannot prepare the schema in PostgreSQL at {self._where}: {reason(exc)}"
            ) from None
        try:
            await self._feed.start(last_seq)
        except StorageError:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._feed.aclose()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                # close() waits for every connection to be released; one stuck in a call
                # to a database that went away must not hold up the shutdown.
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await pool.close()
            except TimeoutError:
                pool.terminate()

    async def ping(self) -> None:
        """Raise StorageError unless the database answers now (the health check)."""

        async def work(conn: Conn, retried: bool) -> None:
            await conn.execute("SELECT 1")

        await self._run(work, retry=True)

    # --- plumbing
    async def _run(
        self,
        work: Callable[[Conn, bool], Awaitable[T]],
        *,
        retry: bool,
    ) -> T:
        """`work(conn, retried)` on a pooled connection; once more after a lost connection
        when `retry` (work that a second run cannot do twice)."""
        if self._pool is None:
            raise StorageError("the PostgreSQL store is not open")
        for attempt in range(2):
            try:
                async with self._pool.acquire(timeout=self._connect_timeout) as conn:
                    return await work(conn, attempt > 0)
            except CONNECTION_ERRORS as exc:
                # Idle connections may have died with this one (a server restart).
                await self._pool.expire_connections()
                if retry and attempt == 0:
                    log.info("PostgreSQL connection lost (%s); retrying once", reason(exc))
                    continue
                raise _DatabaseAway(
                    f"PostgreSQL at {self._where} is unavailable: {reason(exc)}"
                ) from None
            except asyncpg.PostgresError as exc:
                raise StorageError(f"PostgreSQL at {self._where}: {reason(exc)}") from None
        raise AssertionError("unreachable")

    # --- message records and the queue
    async def insert(
        self,
        messages: Sequence[NewMessage],
        *,
        idempotency: tuple[str, str, str, bytes] | None = None,
    ) -> None:
        if not messages:
            return
        if self._pool is None:
            raise StorageError("the PostgreSQL store is not open")
        pending = _Insert(
            messages=messages,
            idempotency=idempotency,
            done=asyncio.get_running_loop().create_future(),
        )
        self._inserts.append(pending)
        if self._flushers < MAX_INSERT_FLUSHERS:
            self._flushers += 1
            task = asyncio.create_task(self._flush_inserts())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # Shielded: a caller that goes away leaves its write to finish with the others.
        await asyncio.shield(pending.done)

    async def _flush_inserts(self) -> None:
        """Write the inserts queued meanwhile, together: one statement (one round trip) for
        all of them instead of one each; under load a batch grows while the one before
        it commits, and alone an insert goes at once. A batch that fails is written again
        insert by insert, so one bad insert fails only its own caller."""
        try:
            while self._inserts:
                batch = self._inserts[:MAX_INSERT_BATCH]
                del self._inserts[:MAX_INSERT_BATCH]
                try:
                    await self._write_inserts(batch)
                except StorageError as exc:
                    if len(batch) == 1 or isinstance(exc, _DatabaseAway):
                        # Written one by one they would fail alike, each after its timeout.
                        for one in batch:
                            _settle(one.done, exc)
                        continue
                    for one in batch:
                        try:
                            await self._write_inserts([one])
                        except StorageError as alone:
                            _settle(one.done, alone)
                        else:
                            _settle(one.done, None)
                else:
                    for one in batch:
                        _settle(one.done, None)
        finally:
            self._flushers -= 1

    async def _write_inserts(self, batch: list[_Insert]) -> None:
        args = _insert_args(batch)
        first = args[0][0]

        async def work(conn: Conn, retried: bool) -> None:
            # Ids are unique: after a lost reply, finding the first one means it committed.
            if retried and await conn.fetchval("SELECT 1 FROM messages WHERE id = $1", first):
                return
            await conn.fetch(_INSERT, *args)

        await self._run(work, retry=True)

    async def insert_history(self, messages: Sequence[NewMessage]) -> None:
        check_history(messages)
        # Other replicas read these: committed before the caller goes on.
        await self.insert(messages)

    async def claim(self, *, now: float, limit: int, lease: float, owner: str) -> list[Claimed]:
        async def work(conn: Conn, retried: bool) -> list[Claimed]:
            rows = await conn.fetch(_CLAIM, now, limit, owner, now + lease)
            return [
                Claimed(
                    id=r["id"],
                    caller=r["caller"],
                    payload=r["payload"] or b"",
                    header_message_id=r["header_message_id"],
                    send_time=r["send_time"],
                    attempts=r["attempts"],
                    lease_until=r["lease_until"],
                )
                for r in rows
            ]

        return await self._run(work, retry=False)

    async def finish(self, id: str, outcome: Finish, *, owner: str, now: float) -> Event | None:
        if outcome.status not in (Status.SENT, Status.FAILED, Status.QUEUED):
            raise ValueError(f"an attempt cannot end in {outcome.status.name}")
        if outcome.status == Status.QUEUED and outcome.next_attempt_time is None:
            raise ValueError("a rescheduled message needs its next attempt time")
        next_time = outcome.next_attempt_time if outcome.status == Status.QUEUED else None

        async def work(conn: Conn, retried: bool) -> Event | None:
            row = await conn.fetchrow(
                _FINISH,
                id,
                owner,
                int(outcome.status),
                now,
                outcome.transport,
                outcome.message_id,
                outcome.error,
                outcome.reason,
                next_time,
                outcome.detail,
            )
            return None if row is None else event_of(row)

        # A retry after a lost commit finds the claim released and writes nothing.
        return await self._run(work, retry=True)

    async def cancel(self, id: str, *, now: float) -> tuple[MessageRecord | None, Event | None]:
        async def work(conn: Conn, retried: bool) -> tuple[MessageRecord | None, Event | None]:
            async with conn.transaction():
                caller = await conn.fetchval(
                    "UPDATE messages SET status = $2, update_time = $3, payload = NULL,"
                    " due_time = NULL, next_attempt_time = NULL"
                    " WHERE id = $1 AND status = ANY($4::smallint[]) RETURNING caller",
                    id,
                    int(Status.CANCELLED),
                    now,
                    [int(s) for s in CANCELLABLE],
                )
                event = None
                if caller is not None:
                    written = await write_events(
                        conn, [(id, now, int(Status.CANCELLED), "cancelled", caller)]
                    )
                    event = written[0]
            return await self._get(conn, id), event

        return await self._run(work, retry=True)

    async def add_event(
        self, header_message_id: str, status: Status | None, detail: str, *, now: float
    ) -> Event | None:
        if not header_message_id.strip().strip("<>"):
            return None

        async def work(conn: Conn, retried: bool) -> Event | None:
            async with conn.transaction():
                return await _add_event(conn, header_message_id, status, detail, now)

        return await self._run(work, retry=False)

    async def _get(self, conn: Conn, id: str) -> MessageRecord | None:
        row = await conn.fetchrow(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = $1", id)
        if row is None:
            return None
        events = await conn.fetch(
            "SELECT seq, message_id, time, status, detail, caller FROM events"
            " WHERE message_id = $1 ORDER BY seq",
            id,
        )
        return _record(row, tuple(event_of(e) for e in events))

    async def get(self, id: str) -> MessageRecord | None:
        async def work(conn: Conn, retried: bool) -> MessageRecord | None:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                return await self._get(conn, id)

        return await self._run(work, retry=True)

    async def list_messages(self, query: ListQuery) -> list[MessageRecord]:
        where: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if query.after is not None:
            where.append(f"(create_time, id) < ({arg(query.after[0])}, {arg(query.after[1])})")
        if query.status is not None:
            where.append(f"status = {arg(int(query.status))}")
        if query.recipient:
            where.append(f"rcpt @> ARRAY[{arg(query.recipient.strip().lower())}::text]")
        if query.caller:
            where.append(f"caller = {arg(query.caller)}")
        sql = (
            f"SELECT {_MESSAGE_COLUMNS} FROM messages"
            + (" WHERE " + " AND ".join(where) if where else "")
            + f" ORDER BY create_time DESC, id DESC LIMIT {arg(max(query.page_size, 0))}"
        )

        async def work(conn: Conn, retried: bool) -> list[MessageRecord]:
            return [_record(r) for r in await conn.fetch(sql, *args)]

        return await self._run(work, retry=True)

    async def next_due(self) -> float | None:
        async def work(conn: Conn, retried: bool) -> float | None:
            value: float | None = await conn.fetchval(
                "SELECT min(due_time) FROM messages WHERE due_time IS NOT NULL"
            )
            return value

        return await self._run(work, retry=True)

    async def queue_stats(self, *, now: float) -> dict[Status, int]:
        async def work(conn: Conn, retried: bool) -> dict[Status, int]:
            rows = await conn.fetch("SELECT status, count(*) FROM messages GROUP BY status")
            return {Status(r[0]): int(r[1]) for r in rows}

        return await self._run(work, retry=True)

    async def oldest_due(self, *, now: float) -> float | None:
        async def work(conn: Conn, retried: bool) -> float | None:
            value: float | None = await conn.fetchval(
                # Leases that ran out are not "waiting": that age is the queue's backlog.
                "SELECT min(due_time) FROM messages WHERE due_time <= $1 AND status <> 3",
                now,
            )
            return value

        return await self._run(work, retry=True)

    async def purge(self, *, before: float, now: float) -> int:
        at = now

        async def work(conn: Conn, retried: bool) -> int:
            async with conn.transaction():
                deleted = await conn.fetchval(
                    "WITH d AS (DELETE FROM messages WHERE update_time < $1"
                    " AND NOT (status = ANY($2::smallint[])) RETURNING 1)"
                    " SELECT count(*) FROM d",
                    before,
                    list(_PENDING_CODES),
                )
                await conn.execute("DELETE FROM idempotency WHERE expire_time <= $1", at)
                await conn.execute("DELETE FROM webhook_tokens WHERE expire_time <= $1", at)
                await conn.execute("DELETE FROM quota_minute WHERE time <= $1", at - 60)
                await conn.execute("DELETE FROM quota_day WHERE day < $1", int(at // 86400))
            return int(deleted)

        return await self._run(work, retry=True)

    # --- idempotency
    async def idempotency_reserve(
        self, caller: str, key: str, fingerprint: str, *, now: float, lease_until: float
    ) -> IdempotencyEntry | None:
        async def work(conn: Conn, retried: bool) -> IdempotencyEntry | None:
            # One statement: a new key, or an expired one (a stored response past its 24 h,
            # or a reservation past its lease: expire_time is the lease's end until a
            # response is stored) taken over, is reserved by us; of concurrent takers the
            # row lock lets one through.
            reserved = await conn.fetchval(
                "INSERT INTO idempotency (caller, key, fingerprint, response, expire_time)"
                " VALUES ($1, $2, $3, NULL, $4) ON CONFLICT (caller, key) DO UPDATE"
                " SET fingerprint = $3, response = NULL, expire_time = $4"
                " WHERE idempotency.expire_time <= $5 RETURNING 1",
                caller,
                key,
                fingerprint,
                lease_until,
                now,
            )
            if reserved:
                return None
            row = await conn.fetchrow(
                "SELECT fingerprint, response FROM idempotency WHERE caller = $1 AND key = $2",
                caller,
                key,
            )
            if row is None:  # released in between: the caller may try again
                return IdempotencyEntry(fingerprint=fingerprint, response=None)
            return IdempotencyEntry(fingerprint=row["fingerprint"], response=row["response"])

        return await self._run(work, retry=False)

    async def idempotency_renew(
        self, caller: str, key: str, *, lease_until: float, new_until: float
    ) -> bool:
        async def work(conn: Conn, retried: bool) -> bool:
            # Matching the new end too makes a retry after a lost reply answer True.
            status = await conn.execute(
                "UPDATE idempotency SET expire_time = $4 WHERE caller = $1 AND key = $2"
                " AND response IS NULL AND expire_time IN ($3, $4)",
                caller,
                key,
                lease_until,
                new_until,
            )
            return status != "UPDATE 0"

        return await self._run(work, retry=True)

    async def idempotency_complete(
        self, caller: str, key: str, response: bytes, *, now: float | None = None
    ) -> None:
        expire_time = (time.time() if now is None else now) + IDEMPOTENCY_TTL

        async def work(conn: Conn, retried: bool) -> None:
            await conn.execute(
                "UPDATE idempotency SET response = $3, expire_time = $4"
                " WHERE caller = $1 AND key = $2",
                caller,
                key,
                response,
                expire_time,
            )

        await self._run(work, retry=True)

    async def idempotency_release(self, caller: str, key: str, *, lease_until: float) -> None:
        async def work(conn: Conn, retried: bool) -> None:
            await conn.execute(
                "DELETE FROM idempotency WHERE caller = $1 AND key = $2 AND response IS NULL"
                " AND expire_time = $3",
                caller,
                key,
                lease_until,
            )

        await self._run(work, retry=True)

    # --- suppressions
    async def suppressed(self, addresses: Sequence[str]) -> set[str]:
        if not addresses:
            return set()

        async def work(conn: Conn, retried: bool) -> set[str]:
            rows = await conn.fetch(
                "SELECT address FROM suppressions WHERE address = ANY($1::text[])",
                sorted({a.lower() for a in addresses}),
            )
            return {r[0] for r in rows}

        return await self._run(work, retry=True)

    async def add_suppression(self, entry: Suppression) -> Suppression:
        async def work(conn: Conn, retried: bool) -> Suppression:
            return await _add_suppression(conn, entry)

        return await self._run(work, retry=True)

    async def delete_suppression(self, address: str) -> bool:
        async def work(conn: Conn, retried: bool) -> bool:
            status = await conn.execute(
                "DELETE FROM suppressions WHERE address = $1",
                address.lower(),
            )
            return bool(status != "DELETE 0")

        return await self._run(work, retry=False)

    async def list_suppressions(self, *, page_size: int, after: str = "") -> list[Suppression]:
        async def work(conn: Conn, retried: bool) -> list[Suppression]:
            rows = await conn.fetch(
                "SELECT address, reason, create_time, detail FROM suppressions"
                " WHERE address > $1 ORDER BY address LIMIT $2",
                after.lower(),
                max(page_size, 0),
            )
            return [
                Suppression(address=r[0], reason=r[1], create_time=r[2], detail=r[3]) for r in rows
            ]

        return await self._run(work, retry=True)

    # --- rate limits
    async def consume_quota(
        self, caller: str, count: int, *, now: float, per_minute: int, per_day: int
    ) -> QuotaResult:
        day = int(now // 86400)

        async def work(conn: Conn, retried: bool) -> QuotaResult:
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                    pg_schema.QUOTA_LOCK_CLASS,
                    caller,
                )
                await conn.execute(
                    "DELETE FROM quota_minute WHERE caller = $1 AND time <= $2",
                    caller,
                    now - 60,
                )
                rows = await conn.fetch(
                    "SELECT time, count FROM quota_minute WHERE caller = $1 ORDER BY time",
                    caller,
                )
                window = [(float(r[0]), int(r[1])) for r in rows]
                minute = sum(n for _, n in window)
                day_count = int(
                    await conn.fetchval(
                        "SELECT count FROM quota_day WHERE caller = $1 AND day = $2",
                        caller,
                        day,
                    )
                    or 0
                )
                minute_ok = per_minute <= 0 or minute + count <= per_minute
                day_ok = per_day <= 0 or day_count + count <= per_day
                if not (minute_ok and day_ok):
                    return QuotaResult(
                        allowed=False,
                        minute_count=minute,
                        day_count=day_count,
                        retry_after=_retry_after(
                            window, count, now, per_minute, per_day, minute_ok, day_ok
                        ),
                    )
                await conn.execute(
                    "INSERT INTO quota_minute (caller, time, count) VALUES ($1, $2, $3)",
                    caller,
                    now,
                    count,
                )
                await conn.execute(
                    "INSERT INTO quota_day (caller, day, count) VALUES ($1, $2, $3)"
                    " ON CONFLICT (caller, day) DO UPDATE SET count = quota_day.count + $3",
                    caller,
                    day,
                    count,
                )
            return QuotaResult(
                allowed=True, minute_count=minute + count, day_count=day_count + count
            )

        return await self._run(work, retry=False)

    # --- webhook tokens
    async def remember_token(self, token: str, *, now: float, ttl: float) -> bool:
        async def work(conn: Conn, retried: bool) -> bool:
            return await _remember_token(conn, token, now, ttl)

        return await self._run(work, retry=False)

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
        async def work(conn: Conn, retried: bool) -> tuple[bool, Event | None]:
            async with conn.transaction():
                if not await _remember_token(conn, token, now, ttl):
                    return False, None
                event = await _add_event(conn, header_message_id, status, detail, now)
                if event is not None and suppression is not None:
                    await _add_suppression(conn, suppression)
                return True, event

        return await self._run(work, retry=False)

    # --- change feed
    def events(self) -> AsyncIterator[Event]:
        return self._feed.subscribe()


async def _add_event(
    conn: Conn, header_message_id: str, status: Status | None, detail: str, now: float
) -> Event | None:
    """add_event's work, inside the caller's transaction."""
    wanted = header_message_id.strip().strip("<>")
    if not wanted:
        return None
    row = await conn.fetchrow(
        "SELECT id, caller, status FROM messages"
        " WHERE (btrim(message_id, '<>') = $1 AND message_id <> '')"
        " OR (btrim(header_message_id, '<>') = $1 AND header_message_id <> '')"
        " ORDER BY create_time DESC, id DESC LIMIT 1 FOR UPDATE",
        wanted,
    )
    if row is None:
        return None
    new_status = int(status) if status is not None else row["status"]
    await conn.execute(
        "UPDATE messages SET status = $2, update_time = $3 WHERE id = $1",
        row["id"],
        new_status,
        now,
    )
    written = await write_events(conn, [(row["id"], now, new_status, detail, row["caller"])])
    return written[0]


async def _add_suppression(conn: Conn, entry: Suppression) -> Suppression:
    row = await conn.fetchrow(
        "INSERT INTO suppressions (address, reason, create_time, detail)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (address) DO UPDATE"
        " SET reason = $2, detail = $4 RETURNING address, reason, create_time, detail",
        entry.address.lower(),
        entry.reason,
        entry.create_time,
        entry.detail,
    )
    assert row is not None
    return Suppression(address=row[0], reason=row[1], create_time=row[2], detail=row[3])


async def _remember_token(conn: Conn, token: str, now: float, ttl: float) -> bool:
    new = await conn.fetchval(
        "INSERT INTO webhook_tokens (token, expire_time) VALUES ($1, $2)"
        " ON CONFLICT (token) DO UPDATE SET expire_time = $2"
        " WHERE webhook_tokens.expire_time <= $3 RETURNING 1",
        token,
        now + ttl,
        now,
    )
    return new is not None


def _retry_after(
    window: Sequence[tuple[float, int]],
    count: int,
    now: float,
    per_minute: int,
    per_day: int,
    minute_ok: bool,
    day_ok: bool,
) -> float | None:
    """Seconds until `count` more would fit in both windows; None if it never can."""
    waits: list[float] = []
    if not minute_ok:
        if count > per_minute:
            return None
        remaining = sum(n for _, n in window)
        for at, n in window:  # oldest first: each leaves the window 60 s after it came
            remaining -= n
            if remaining + count <= per_minute:
                waits.append(at + 60 - now)
                break
    if not day_ok:
        if count > per_day:
            return None
        waits.append((math.floor(now / 86400) + 1) * 86400 - now)
    return max(0.0, *waits) if waits else None
