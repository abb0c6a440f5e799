"""SettingsStore: the settings and ACL files, loaded once, served from memory, written safely."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from mailsvc import settings as rules
from mailsvc.errors import Aborted, FailedPrecondition, InvalidArgument
from mailsvc.templates import CompiledTemplate, TemplateEngine
from mailsvc.v1.settings_pb2 import MailSettings, SettingsAcl

M = TypeVar("M", bound=Message)


SETTINGS_FILE = "settings.json"
ACL_FILE = "acl.json"
LOCK_FILE = ".settings.lock"


class WriteCancelled(Exception):
    """The caller went away before the write began; nothing was written."""


class SettingsFileError(Exception):
    """A settings or ACL file exists but cannot be used; the server must not start."""


@dataclass(frozen=True)
class Snapshot:
    """One version of the settings with everything derived from it; never mutated."""

    settings: MailSettings
    etag: str
    acl: SettingsAcl
    templates: Mapping[str, CompiledTemplate] = field(default_factory=dict)


class SettingsBackend(Protocol):
    """What the servicers need of a settings store: SettingsStore (files) or PgSettingsStore."""

    @property
    def snapshot(self) -> Snapshot: ...

    async def update(
        self, change: Callable[[MailSettings], MailSettings], etag: str = ""
    ) -> Snapshot: ...

    async def update_acl(self, acl: SettingsAcl) -> Snapshot: ...

    async def reload_if_changed(self) -> bool: ...


def _atomic_write(path: Path, data: bytes) -> None:
    # mkstemp: a fresh name opened with O_CREAT|O_EXCL (mode 0600), so a planted file or
    # symlink can neither receive the data nor be followed.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# The etag of settings never written: the digest of an empty file. Both settings stores use it.
EMPTY_ETAG = _digest(b"")


def settings_json(message: Message) -> str:
    """How both settings stores write settings and ACL: protobuf JSON, sorted, indented."""
    return json_format.MessageToJson(message, indent=2, sort_keys=True) + "\n"


def _to_json(message: Message) -> bytes:
    return settings_json(message).encode()


def checked_snapshot(
    settings: MailSettings, etag: str, acl: SettingsAcl, engine: TemplateEngine, where: str
) -> Snapshot:
    """The snapshot of stored settings; SettingsFileError naming `where` if they are invalid."""
    compiled, violations = rules.check(settings, engine)
    if violations:
        listed = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise SettingsFileError(f"{where}: invalid settings: {listed}")
    settings.ClearField("etag")
    return Snapshot(settings, etag, acl, compiled)


def _read(path: Path, message: M) -> tuple[M, bytes] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SettingsFileError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        json_format.Parse(data.decode("utf-8"), message)
    except (json_format.ParseError, UnicodeDecodeError, ValueError) as exc:
        raise SettingsFileError(f"{path}: {_describe(str(exc))}") from None
    return message, data


def _describe(error: str) -> str:
    """The parser's complaint without any value from the file, which may be a secret."""
    if error.startswith("Failed to load JSON"):
        return "not valid JSON: " + error.removeprefix("Failed to load JSON: ")
    fields = re.findall(r"Failed to parse (\w+) field", error)
    unknown = re.search(r'has no field named "([^"]+)"', error)
    if unknown:
        return f"unknown field {'.'.join([*fields, unknown.group(1)])}"
    if fields:
        return f"field {'.'.join(fields)} has a value of the wrong type"
    return "not valid settings JSON"


class SettingsStore:
    """Reads are from memory; writes are serialized in-process and across processes."""

    def __init__(self, data_dir: Path, engine: TemplateEngine) -> None:
        self._settings_path = data_dir / SETTINGS_FILE
        self._acl_path = data_dir / ACL_FILE
        self._lock_path = data_dir / LOCK_FILE
        self._engine = engine
        self._lock = asyncio.Lock()
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._stamp = self._disk_stamp()
        self._bad_stamp: tuple[tuple[int, int, int] | None, ...] | None = None
        self._snapshot = self._load()

    def _disk_stamp(self) -> tuple[tuple[int, int, int] | None, ...]:
        """What identifies the files' current versions, to notice writes by anyone else."""
        stamps: list[tuple[int, int, int] | None] = []
        for path in (self._settings_path, self._acl_path):
            try:
                st = path.stat()
                stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                stamps.append(None)
        return tuple(stamps)

    def _current(self) -> Snapshot:
        """The snapshot, re-read only if another process changed the files since."""
        stamp = self._disk_stamp()
        if stamp == self._stamp:
            return self._snapshot
        try:
            snapshot = self._load()
        except SettingsFileError as exc:
            raise FailedPrecondition(
                f"the settings file was edited and is now invalid ({exc}); fix or restore it",
                reason="SETTINGS_FILE_INVALID",
            ) from None
        return snapshot

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def _load(self) -> Snapshot:
        loaded = _read(self._settings_path, MailSettings())
        settings, data = loaded if loaded else (MailSettings(), b"")
        acl_loaded = _read(self._acl_path, SettingsAcl())
        acl = acl_loaded[0] if acl_loaded else SettingsAcl()
        # The etag is the file's digest: every write (which stores a fresh nonce in the
        # file's etag field) and every edit from outside changes it.
        return checked_snapshot(
            settings, _digest(data), acl, self._engine, str(self._settings_path)
        )

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _publish(self, snapshot: Snapshot) -> Snapshot:
        self._snapshot = snapshot
        return snapshot

    async def _commit(self, write: Callable[[threading.Event], Snapshot]) -> Snapshot:
        """Run `write` in a thread and publish its snapshot. Once the file is written, memory
        is published too even if the caller is cancelled meanwhile (the work is shielded); a
        caller cancelled before the write began gets nothing written."""
        cancelled = threading.Event()

        async def run() -> Snapshot:
            async with self._lock:
                if cancelled.is_set():
                    raise WriteCancelled
                return self._publish(await asyncio.to_thread(write, cancelled))

        task = asyncio.ensure_future(run())
        # Retrieve the outcome even when nobody awaits it any more.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def update(
        self, change: Callable[[MailSettings], MailSettings], etag: str = ""
    ) -> Snapshot:
        """Apply `change` to the current settings if `etag` (when given) is current; persist."""
        return await self._commit(lambda cancelled: self._update_locked(change, etag, cancelled))

    def _update_locked(
        self,
        change: Callable[[MailSettings], MailSettings],
        etag: str,
        cancelled: threading.Event,
    ) -> Snapshot:
        with self._file_lock():
            current = self._current()
            if etag and etag != current.etag:
                raise Aborted("etag does not match the stored settings: read them again and retry")
            new = change(current.settings)
            compiled, violations = rules.check(new, self._engine)
            if violations:
                raise InvalidArgument(violations)
            stored = rules.for_storage(new)
            stored.etag = secrets.token_hex(8)
            data = _to_json(stored)
            if cancelled.is_set():
                raise WriteCancelled
            _atomic_write(self._settings_path, data)
            self._stamp = self._disk_stamp()
            stored.ClearField("etag")
            return Snapshot(stored, _digest(data), current.acl, compiled)

    async def reload_if_changed(self) -> bool:
        """Pick up an edit made outside the service; an invalid one raises SettingsFileError
        and the settings in memory keep serving. True when something new was loaded."""
        async with self._lock:
            stamp = self._disk_stamp()
            if stamp in (self._stamp, self._bad_stamp):
                return False
            try:
                snapshot = await asyncio.to_thread(self._load)
            except SettingsFileError:
                self._bad_stamp = stamp  # reported once, not at every look
                raise
            self._stamp = stamp
            if snapshot.etag == self._snapshot.etag and snapshot.acl == self._snapshot.acl:
                return False
            self._publish(snapshot)
            return True

    async def update_acl(self, acl: SettingsAcl) -> Snapshot:
        def write(cancelled: threading.Event) -> Snapshot:
            with self._file_lock():
                current = self._current()
                if cancelled.is_set():
                    raise WriteCancelled
                _atomic_write(self._acl_path, _to_json(acl))
                self._stamp = self._disk_stamp()
                return Snapshot(current.settings, current.etag, acl, current.templates)

        return await self._commit(write)
