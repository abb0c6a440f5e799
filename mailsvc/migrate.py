"""`mailsvc migrate-to-database`: copy an embedded data dir's settings, ACL and suppressions
into the PostgreSQL database of `--database-url`, so an install can move to replicas
without typing its settings again."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from mailsvc.pgsettings import PgSettingsStore
from mailsvc.storage.base import PENDING, StorageError, StorageOpenError, Suppression
from mailsvc.storage.factory import where
from mailsvc.storage.postgres import PostgresStorage
from mailsvc.storage.sqlite import FILE_NAME, SqliteStorage
from mailsvc.store import SettingsStore
from mailsvc.templates import TemplateEngine
from mailsvc.v1.settings_pb2 import MailSettings

PAGE = 1000


class NotEmpty(Exception):
    """The database already holds settings: not overwritten without --force."""


@dataclass(frozen=True)
class Copied:
    where: str
    suppressions: int
    pending_left: int  # queued or scheduled mails that stay in the embedded store


async def _embedded_rest(data_dir: Path) -> tuple[list[Suppression], int]:
    """The suppressions and the number of pending mails of the embedded database."""
    path = data_dir / FILE_NAME
    if not path.exists():
        return [], 0
    sqlite = SqliteStorage(path)
    await sqlite.open()
    try:
        out: list[Suppression] = []
        while True:
            page = await sqlite.list_suppressions(
                page_size=PAGE, after=out[-1].address if out else ""
            )
            out.extend(page)
            if len(page) < PAGE:
                break
        stats = await sqlite.queue_stats(now=time.time())
        return out, sum(n for status, n in stats.items() if status in PENDING)
    finally:
        await sqlite.aclose()


async def copy_to_database(data_dir: Path, url: str, *, force: bool) -> Copied:
    """Raises SettingsFileError (the files cannot be used), StorageOpenError (a store cannot
    be opened) and NotEmpty."""
    shown = where(url)
    engine = TemplateEngine()
    source = SettingsStore(data_dir, engine).snapshot
    suppressions, pending = await _embedded_rest(data_dir)
    target = PgSettingsStore(url, engine)
    try:
        await target.open()
    except StorageError as exc:
        raise StorageOpenError(str(exc)) from None
    storage = PostgresStorage(url, pool_size=2)
    try:
        await storage.open()
        present = target.snapshot
        if not force and (present.settings.ByteSize() or present.acl.ByteSize()):
            raise NotEmpty(
                f"PostgreSQL at {shown} already holds settings: use --force to overwrite them"
            )

        def replace(current: MailSettings) -> MailSettings:
            new = MailSettings()
            new.CopyFrom(source.settings)
            return new

        await target.update(replace)
        await target.update_acl(source.acl)
        for entry in suppressions:
            await storage.add_suppression(entry)
    finally:
        await storage.aclose()
        await target.aclose()
    return Copied(shown, len(suppressions), pending)
