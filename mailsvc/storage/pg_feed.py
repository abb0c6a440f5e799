"""The change feed of the PostgreSQL store: event rows announced with NOTIFY in the
transaction that writes them, and one LISTENing connection per process that fans them out.

A NOTIFY payload is a JSON list of events ([seq, message_id, time, status, detail, caller]);
one over PostgreSQL's 8000-byte limit is sent as [seq] and read back. Each event is announced
by the statement that writes it (`announcing`). After a lost connection the listener
reconnects and replays, from the events table, the rows past the last seq it saw (best
effort: seqs are not commit-ordered).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import unquote, urlsplit

import asyncpg

from mailsvc.storage import pg_schema
from mailsvc.storage.base import Event, Status, StorageError

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger(__name__)
Conn: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

# A connection that broke, or a server that is going away or not there yet.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    # A connection the server closed mid-operation can be left in a state asyncpg refuses
    # to use ("cannot switch to state ..."): as good as lost.
    asyncpg.exceptions.InternalClientError,
)
DB_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)
_NOTIFY_LIMIT = 7900  # bytes; PostgreSQL's limit is 8000
_SUBSCRIBER_BACKLOG = 10_000
_RECENT_SEQS = 4096
_EVENT_INSERT = """
INSERT INTO events (message_id, time, status, detail, caller)
SELECT * FROM unnest($1::text[], $2::float8[], $3::smallint[], $4::text[], $5::text[])
RETURNING seq, message_id, time, status, detail, caller
"""
_EVENT_COLUMNS = "ev.seq, ev.message_id, ev.time, ev.status, ev.detail, ev.caller"
# The announcement of one event row: [[seq, message_id, time, status, detail, caller]], or
# [[seq]] when that is over PostgreSQL's limit (listeners read the row back).
_ANNOUNCEMENT = f"""
pg_notify('{pg_schema.EVENTS_CHANNEL}', CASE
    WHEN octet_length(json_build_array(json_build_array({_EVENT_COLUMNS}))::text)
        <= {_NOTIFY_LIMIT}
    THEN json_build_array(json_build_array({_EVENT_COLUMNS}))::text
    ELSE json_build_array(json_build_array(ev.seq))::text END)
"""


def announcing(ctes: str, *, select: str = _EVENT_COLUMNS, join: str = "") -> str:
    """A statement that writes and announces its event rows, in one round trip instead of a
    transaction of several. `ctes`: WITH ..., the last one `ev`, an INSERT INTO events
    RETURNING the event columns. It returns `select` FROM ev `join`, one row per event."""
    return f"{ctes}\nSELECT {select}, {_ANNOUNCEMENT} AS announced FROM ev {join}"


_ANNOUNCED_INSERT = announcing(f"WITH ev AS ({_EVENT_INSERT})", join="ORDER BY ev.seq")


@dataclass(frozen=True)
class _Where:
    """host:port/database of a URL, for messages (never the user's password)."""

    host: str
    port: int
    database: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}/{self.database}"


def describe_url(url: str) -> _Where:
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise StorageError("the database URL must start with postgresql://")
    try:
        port = parts.port or 5432
    except ValueError:
        raise StorageError("the database URL has an invalid port") from None
    return _Where(parts.hostname or "localhost", port, unquote(parts.path.lstrip("/")) or "")


def reason(exc: BaseException) -> str:
    """Plain words for a driver or socket error, without anything from the URL."""
    if isinstance(exc, asyncpg.PostgresError):
        return f"{type(exc).__name__} ({exc.sqlstate}): {exc.args[0] if exc.args else ''}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return type(exc).__name__


def event_of(row: asyncpg.Record | Sequence[Any]) -> Event:
    # float(): PostgreSQL's JSON writes a whole float8 as an integer.
    return Event(
        message_id=row[1], time=float(row[2]), status=Status(row[3]), detail=row[4], caller=row[5]
    )


async def close_listener(conn: Any) -> None:
    """Close a listening connection within 2 s, else drop it: the database may be away."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2):
            await conn.close()
    if not conn.is_closed():
        conn.terminate()


async def write_events(
    conn: Conn, events: Sequence[tuple[str, float, int, str, str]]
) -> list[Event]:
    """Insert event rows and announce them, inside the caller's transaction."""
    if not events:
        return []
    rows = await conn.fetch(
        _ANNOUNCED_INSERT,
        [e[0] for e in events],
        [e[1] for e in events],
        [e[2] for e in events],
        [e[3] for e in events],
        [e[4] for e in events],
    )
    return [event_of(r) for r in rows]


class _Subscription:
    """One events() iterator: a bounded backlog, ended by aclose() or by an error."""

    def __init__(self, owner: EventFeed) -> None:
        self._owner = owner
        self._items: deque[Event] = deque()
        self._error: BaseException | None = None
        self._closed = False
        self._wake = asyncio.Event()

    def push(self, event: Event) -> None:
        if len(self._items) >= _SUBSCRIBER_BACKLOG:
            self.fail(StorageError("the event watcher fell too far behind"))
            return
        self._items.append(event)
        self._wake.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._owner._subscribers.discard(self)
        self._wake.set()

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> Event:
        while not self._items:
            if self._closed:
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            self._wake.clear()
            await self._wake.wait()
        return self._items.popleft()

    async def aclose(self) -> None:
        self._closed = True
        self._owner._subscribers.discard(self)
        self._wake.set()


class EventFeed:
    """One process's view of every event written by any process sharing the database."""

    def __init__(
        self, url: str, where: _Where, *, connect_timeout: float, listen_retry: float
    ) -> None:
        self._url = url
        self._where = where
        self._connect_timeout = connect_timeout
        self._listen_retry = listen_retry
        self._subscribers: set[_Subscription] = set()
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._recent: deque[int] = deque(maxlen=_RECENT_SEQS)
        self._recent_set: set[int] = set()
        self._last_seq = 0

    async def start(self, last_seq: int) -> None:
        """Listen; returns once listening, so subscribers miss nothing written after."""
        self._last_seq = last_seq
        self._listener = asyncio.create_task(self._listen(), name="pg-events-listener")
        listening = asyncio.ensure_future(self._listening.wait())
        await asyncio.wait(
            [listening, self._listener],
            timeout=self._connect_timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        listening.cancel()
        if not self._listening.is_set():
            await self.aclose()
            raise StorageError(f"cannot LISTEN on PostgreSQL at {self._where}")

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        for sub in list(self._subscribers):
            await sub.aclose()

    def subscribe(self) -> AsyncIterator[Event]:
        sub = _Subscription(self)
        self._subscribers.add(sub)
        return sub

    def _publish(self, event: Event, seq: int) -> None:
        if seq in self._recent_set:
            return
        if len(self._recent) == self._recent.maxlen:
            self._recent_set.discard(self._recent[0])
        self._recent.append(seq)
        self._recent_set.add(seq)
        self._last_seq = max(self._last_seq, seq)
        for sub in list(self._subscribers):
            sub.push(event)

    async def _listen(self) -> None:
        """Keep one LISTENing connection; after a break, catch up from the events table."""
        first = True
        while True:
            conn: asyncpg.Connection[Any] | None = None
            try:
                conn = await asyncpg.connect(self._url, timeout=self._connect_timeout)
                lost, inbox = await self._subscribe(conn)
                if not first:
                    await self._catch_up(conn)
                first = False
                self._listening.set()
                while not lost.is_set():
                    getter = asyncio.ensure_future(inbox.get())
                    waiter = asyncio.ensure_future(lost.wait())
                    try:
                        await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
                        if not getter.done():
                            getter.cancel()
                    if getter.done() and not getter.cancelled():
                        await self._deliver(conn, getter.result())
                    while not inbox.empty():
                        await self._deliver(conn, inbox.get_nowait())
                log.warning("PostgreSQL event listener lost its connection; reconnecting")
            except asyncio.CancelledError:
                raise
            except DB_ERRORS as exc:
                log.warning(
                    "PostgreSQL event listener at %s: %s; retrying", self._where, reason(exc)
                )
            finally:
                if conn is not None:
                    await close_listener(conn)
            await asyncio.sleep(self._listen_retry)

    @staticmethod
    async def _subscribe(
        conn: asyncpg.Connection[Any],
    ) -> tuple[asyncio.Event, asyncio.Queue[str]]:
        lost = asyncio.Event()
        inbox: asyncio.Queue[str] = asyncio.Queue()
        conn.add_termination_listener(lambda _c: lost.set())
        await conn.add_listener(
            pg_schema.EVENTS_CHANNEL, lambda _c, _p, _ch, payload: inbox.put_nowait(payload)
        )
        return lost, inbox

    async def _deliver(self, conn: Conn, payload: str) -> None:
        for item in json.loads(payload):
            if len(item) == 6:
                self._publish(event_of(item), int(item[0]))
                continue
            row = await conn.fetchrow(
                "SELECT seq, message_id, time, status, detail, caller FROM events WHERE seq = $1",
                int(item[0]),
            )
            if row is not None:
                self._publish(event_of(row), int(row[0]))

    async def _catch_up(self, conn: Conn) -> None:
        """Events committed while no connection listened (best effort: by seq)."""
        rows = await conn.fetch(
            "SELECT seq, message_id, time, status, detail, caller FROM events"
            " WHERE seq > $1 ORDER BY seq LIMIT 10000",
            self._last_seq,
        )
        for row in rows:
            self._publish(event_of(row), int(row[0]))
