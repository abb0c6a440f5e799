"""Sending: validate a request into a Mail, pick the transport, hand the mail over once."""

from __future__ import annotations

import asyncio

import httpx

from mailsvc.config import Config
from mailsvc.errors import DeadlineExceeded, FailedPrecondition
from mailsvc.message import Mail
from mailsvc.store import Snapshot
from mailsvc.transports.base import Delivery, Transport
from mailsvc.transports.maildir import MaildirTransport
from mailsvc.transports.mailgun import REGION_URLS, MailgunAccount, MailgunTransport
from mailsvc.transports.smtp import SmtpAccount, SmtpTransport
from mailsvc.v1.settings_pb2 import MailSettings, Region


class Mailer:
    """Owns the transports built from the current settings and the shared HTTP client."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._http = httpx.AsyncClient(timeout=30.0)
        self._etag: str | None = None
        self._transports: list[Transport] = []

    def _build(self, settings: MailSettings) -> list[Transport]:
        limit = self._config.max_message_bytes
        transports: list[Transport] = []
        if settings.HasField("smtp"):
            s = settings.smtp
            account = SmtpAccount(
                host=s.host,
                port=s.port,
                login=s.login,
                password=s.password,
                start_tls_required=s.start_tls_required,
                ssl_on_connect=s.ssl_on_connect,
            )
            transports.append(
                SmtpTransport(account, max_message_bytes=limit, timeout=self._config.smtp_timeout)
            )
        if settings.HasField("mailgun"):
            m = settings.mailgun
            region = "EU" if m.region == Region.EU else "US"
            base = self._config.mailgun_base_url or REGION_URLS[region]
            account_mg = MailgunAccount(domain=m.domain, key=m.key, base_url=base)
            transports.append(MailgunTransport(account_mg, self._http, max_message_bytes=limit))
        if not transports and self._config.dev:
            transports.append(MaildirTransport(self._config.outbox_dir, max_message_bytes=limit))
        return transports

    def transports(self, snapshot: Snapshot) -> list[Transport]:
        if snapshot.etag != self._etag:
            self._transports = self._build(snapshot.settings)
            self._etag = snapshot.etag
        return self._transports

    async def send(self, snapshot: Snapshot, mail: Mail, *, timeout: float | None) -> Delivery:
        """Hand the mail to the first configured transport, within the caller's deadline."""
        transports = self.transports(snapshot)
        if not transports:
            raise FailedPrecondition("no mail transport configured", reason="NO_TRANSPORT")
        transport = transports[0]
        budget = timeout if timeout is not None else self._config.smtp_timeout
        try:
            async with asyncio.timeout(budget):
                return await transport.send(mail, timeout=budget)
        except TimeoutError:
            raise DeadlineExceeded(
                "the mail could not be handed over before the deadline"
            ) from None

    async def aclose(self) -> None:
        for transport in self._transports:
            await transport.aclose()
        await self._http.aclose()
