"""Which stores a server uses: the embedded ones in the data dir, or PostgreSQL shared by
replicas (`--database-url`). The one place that knows both kinds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mailsvc.config import Config
from mailsvc.pgsettings import PgSettingsStore
from mailsvc.storage.base import Storage, StorageError, StorageOpenError
from mailsvc.storage.pg_feed import describe_url
from mailsvc.storage.postgres import PostgresStorage
from mailsvc.storage.sqlite import FILE_NAME, SqliteStorage
from mailsvc.store import SettingsBackend, SettingsStore
from mailsvc.templates import TemplateEngine


@dataclass(frozen=True)
class Stores:
    """The settings and the rest, opened; `close()` when done."""

    settings: SettingsBackend
    storage: Storage
    # Raises StorageError while the shared database is away (None: nothing to watch).
    probe: Callable[[], Awaitable[None]] | None
    # Whether other processes write too: then their changes come through `storage.events()`.
    shared: bool
    # Whether settings are re-read from disk by the server (the embedded files).
    file_settings: bool

    async def close(self) -> None:
        await self.storage.aclose()
        if isinstance(self.settings, PgSettingsStore):
            await self.settings.aclose()


def where(url: str) -> str:
    """host:port/database of a database URL, for messages (never its password)."""
    try:
        return str(describe_url(url))
    except StorageError as exc:
        raise StorageOpenError(str(exc)) from None


async def open_stores(config: Config, engine: TemplateEngine) -> Stores:
    """Open the stores `config` names. Raises StorageOpenError (the server must not start)
    and SettingsFileError (stored settings that cannot be used)."""
    if not config.database_url:
        settings = SettingsStore(config.data_dir, engine)
        sqlite = SqliteStorage(config.data_dir / FILE_NAME)
        await sqlite.open()
        return Stores(settings, sqlite, None, shared=False, file_settings=True)
    url = config.database_url
    where(url)
    postgres = PostgresStorage(url, pool_size=config.database_pool_size)
    await postgres.open()
    pg_settings = PgSettingsStore(url, engine)
    try:
        await pg_settings.open()
    except StorageError as exc:
        await postgres.aclose()
        raise StorageOpenError(str(exc)) from None
    except BaseException:
        await postgres.aclose()
        raise
    return Stores(pg_settings, postgres, postgres.ping, shared=True, file_settings=False)
