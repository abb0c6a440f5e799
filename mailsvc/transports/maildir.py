"""Dev transport: each mail becomes an .eml file in <data-dir>/outbox/."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from mailsvc.message import Mail
from mailsvc.mime import build_mime, new_message_id
from mailsvc.transports.base import Delivery, check_size


class MaildirTransport:
    name = "maildir"

    def __init__(self, outbox: Path, *, max_message_bytes: int) -> None:
        self._outbox = outbox
        self._max_bytes = max_message_bytes

    def _write(self, raw: bytes) -> None:
        self._outbox.mkdir(parents=True, exist_ok=True)
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(6).hex()}.eml"
        tmp = self._outbox / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._outbox / name)

    async def send(self, mail: Mail, *, timeout: float, message_id: str = "") -> Delivery:
        message_id = message_id or new_message_id(mail.sender)
        raw = build_mime(mail, message_id)
        check_size(len(raw), self._max_bytes)
        await asyncio.to_thread(self._write, raw)
        return Delivery(message_id, self.name, mail.recipients)

    async def aclose(self) -> None:
        return None
