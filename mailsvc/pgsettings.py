"""PgSettingsStore: the settings and ACL in PostgreSQL, shared by every replica.

Same public API as store.SettingsStore. Reads are served from memory. A write through any
replica is announced with NOTIFY, and every replica also looks at the stored etags every
`check_interval` seconds, so a change is used everywhere within about a second even when a
notification is lost. While the database is away the last good copy keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

import asyncpg
from google.protobuf import json_format
from google.protobuf.message import Message

from mailsvc import settings as rules
from mailsvc.errors import Aborted, FailedPrecondition, InvalidArgument
from mailsvc.storage import pg_schema
from mailsvc.storage.base import StorageError
from mailsvc.storage.pg_feed import close_listener, describe_url
from mailsvc.store import (
    EMPTY_ETAG,
    SettingsFileError,
    Snapshot,
    checked_snapshot,
    settings_json,
)
from mailsvc.templates import TemplateEngine
from mailsvc.v1.settings_pb2 import MailSettings, SettingsAcl

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)
_SETTINGS, _ACL = "settings", "acl"
CLOSE_TIMEOUT = 5.0  # seconds
_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)
_Rows = dict[str, tuple[str, str]]  # name -> (data, etag)


def _parse(data: str, message: M, what: str) -> M:
    try:
        json_format.Parse(data, message)
    except (json_format.ParseError, ValueError):
        # Never the parser's words: they may quote a secret.
        raise SettingsFileError(f"the {what} stored in the database are not valid") from None
    return message


class PgSettingsStore:
    """Settings and ACL rows in PostgreSQL, cached in memory; see store.SettingsStore."""

    def __init__(
        self,
        url: str,
        engine: TemplateEngine,
        *,
        check_interval: float = 0.5,
        connect_timeout: float = 10.0,
    ) -> None:
        self._url = url
        self._where = describe_url(url)
        self._engine = engine
        self._check_interval = check_interval
        self._connect_timeout = connect_timeout
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()
        self._snapshot = Snapshot(MailSettings(), EMPTY_ETAG, SettingsAcl())
        self._etags: tuple[str, str] = ("", "")  # (settings, acl) rows as last loaded
        self._bad: tuple[str, str] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    # --- lifecycle
    async def open(self) -> None:
        """Create or migrate the schema and load; SettingsFileError if the stored settings
        are invalid (the server must not start), StorageError if the database is away."""
        try:
            self._pool = await asyncpg.create_pool(
                self._url, min_size=0, max_size=2, timeout=self._connect_timeout
            )
            async with self._pool.acquire() as conn:
                await pg_schema.migrate(conn)
                rows = await self._rows(conn)
        except pg_schema.SchemaTooNew as exc:
            await self.aclose()
            raise StorageError(f"PostgreSQL at {self._where}: {exc}") from None
        except _ERRORS as exc:
            await self.aclose()
            raise StorageError(
                f"cannot load the settings from PostgreSQL at {self._where}: {type(exc).__name__}"
            ) from None
        try:
            self._install(rows)
        except SettingsFileError:
            await self.aclose()
            raise
        self._tasks = [
            asyncio.create_task(self._listen(), name="pg-settings-listener"),
            asyncio.create_task(self._poll(), name="pg-settings-poll"),
        ]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                # close() waits for every connection to be released; one stuck in a call
                # to a database that went away must not hold up the shutdown.
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await pool.close()
            except TimeoutError:
                pool.terminate()

    # --- reading
    @staticmethod
    async def _rows(conn: Any) -> _Rows:
        rows = await conn.fetch("SELECT name, data, etag FROM settings")
        return {r["name"]: (r["data"], r["etag"]) for r in rows}

    def _build(self, rows: _Rows) -> Snapshot:
        data, etag = rows.get(_SETTINGS, ("", EMPTY_ETAG))
        settings = _parse(data, MailSettings(), "settings") if data else MailSettings()
        acl_data = rows.get(_ACL, ("", ""))[0]
        acl = _parse(acl_data, SettingsAcl(), "settings ACL") if acl_data else SettingsAcl()
        return checked_snapshot(
            settings, etag, acl, self._engine, "the settings stored in the database"
        )

    @staticmethod
    def _etags_of(rows: _Rows) -> tuple[str, str]:
        return (rows.get(_SETTINGS, ("", ""))[1], rows.get(_ACL, ("", ""))[1])

    def _install(self, rows: _Rows) -> bool:
        etags = self._etags_of(rows)
        if etags == self._etags:
            return False
        snapshot = self._build(rows)
        self._etags = etags
        changed = snapshot.etag != self._snapshot.etag or snapshot.acl != self._snapshot.acl
        self._snapshot = snapshot
        return changed

    async def reload_if_changed(self) -> bool:
        """Pick up a write made by another replica. Invalid stored settings raise
        SettingsFileError once and the last good copy keeps serving; so does a database
        that is away (then False)."""
        if self._pool is None:
            return False
        async with self._lock:
            try:
                async with self._pool.acquire(timeout=self._connect_timeout) as conn:
                    rows = await self._rows(conn)
            except _ERRORS as exc:
                log.debug("settings check skipped, database away: %s", type(exc).__name__)
                return False
            etags = self._etags_of(rows)
            if etags in (self._etags, self._bad):
                return False
            try:
                return self._install(rows)
            except SettingsFileError:
                self._bad = etags
                raise

    # --- writing
    async def update(
        self, change: Callable[[MailSettings], MailSettings], etag: str = ""
    ) -> Snapshot:
        """Apply `change` to the stored settings if `etag` (when given) is theirs."""
        async with self._lock:

            async def work(conn: Any) -> Snapshot:
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO settings (name, data, etag) VALUES ($1, '', $2)"
                        " ON CONFLICT DO NOTHING",
                        _SETTINGS,
                        EMPTY_ETAG,
                    )
                    row = await conn.fetchrow(
                        "SELECT data, etag FROM settings WHERE name = $1 FOR UPDATE", _SETTINGS
                    )
                    current_etag = row["etag"]
                    if etag and etag != current_etag:
                        raise Aborted(
                            "etag does not match the stored settings: read them again and retry"
                        )
                    try:
                        current = (
                            _parse(row["data"], MailSettings(), "settings")
                            if row["data"]
                            else MailSettings()
                        )
                    except SettingsFileError as exc:
                        raise FailedPrecondition(
                            f"{exc}; fix or restore them", reason="SETTINGS_FILE_INVALID"
                        ) from None
                    current.ClearField("etag")
                    new = change(current)
                    compiled, violations = rules.check(new, self._engine)
                    if violations:
                        raise InvalidArgument(violations)
                    stored = rules.for_storage(new)
                    stored.ClearField("etag")
                    new_etag = secrets.token_hex(8)
                    await conn.execute(
                        "UPDATE settings SET data = $2, etag = $3 WHERE name = $1",
                        _SETTINGS,
                        settings_json(stored),
                        new_etag,
                    )
                    await conn.execute("SELECT pg_notify($1, $2)", pg_schema.SETTINGS_CHANNEL, "")
                acl = self._snapshot.acl
                self._etags = (new_etag, self._etags[1])
                self._snapshot = Snapshot(stored, new_etag, acl, compiled)
                return self._snapshot

            return await self._write(work)

    async def update_acl(self, acl: SettingsAcl) -> Snapshot:
        async with self._lock:

            async def work(conn: Any) -> Snapshot:
                new_etag = secrets.token_hex(8)
                await conn.execute(
                    "INSERT INTO settings (name, data, etag) VALUES ($1, $2, $3)"
                    " ON CONFLICT (name) DO UPDATE SET data = $2, etag = $3;",
                    _ACL,
                    settings_json(acl),
                    new_etag,
                )
                await conn.execute("SELECT pg_notify($1, $2)", pg_schema.SETTINGS_CHANNEL, "")
                current = self._snapshot
                self._etags = (self._etags[0], new_etag)
                self._snapshot = Snapshot(current.settings, current.etag, acl, current.templates)
                return self._snapshot

            return await self._write(work)

    async def _write(self, work: Callable[[Any], Any]) -> Snapshot:
        if self._pool is None:
            raise StorageError("the settings store is not open")
        try:
            async with self._pool.acquire(timeout=self._connect_timeout) as conn:
                snapshot: Snapshot = await work(conn)
                return snapshot
        except _ERRORS as exc:
            # Not retried: a lost reply may hide a committed write, and the caller's
            # etag then no longer matches; the caller sees UNAVAILABLE and reads again.
            raise StorageError(
                f"cannot write the settings to PostgreSQL at {self._where}: {type(exc).__name__}"
            ) from None

    # --- propagation
    async def _refresh(self) -> None:
        try:
            if await self.reload_if_changed():
                log.info("settings changed by another replica: reloaded")
        except SettingsFileError as exc:
            log.error("stored settings ignored, the last good settings keep serving: %s", exc)

    async def _poll(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for may swallow a cancel that
            # arrives as the event is set, and aclose() would then wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._check_interval):
                    await self._wake.wait()
            self._wake.clear()
            await self._refresh()

    async def _subscribe(self, conn: Any) -> asyncio.Event:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        await conn.add_listener(pg_schema.SETTINGS_CHANNEL, lambda *_args: self._wake.set())
        return lost

    async def _listen(self) -> None:
        while True:
            conn: Any = None
            try:
                conn = await asyncpg.connect(self._url, timeout=self._connect_timeout)
                lost = await self._subscribe(conn)
                self._wake.set()  # whatever was missed while not listening
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except _ERRORS as exc:
                log.debug("settings listener: %s; retrying", type(exc).__name__)
            finally:
                if conn is not None:
                    await close_listener(conn)
            await asyncio.sleep(1)
