"""SMTP transport with aiosmtplib: a bounded pool of verified-TLS, authenticated connections."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiosmtplib

from mailsvc.addresses import is_loopback_host
from mailsvc.dkim import DkimSigner
from mailsvc.errors import (
    DeliveryUncertain,
    FailedPrecondition,
    MailsvcError,
    ResourceExhausted,
    Unavailable,
)
from mailsvc.message import Mail
from mailsvc.mime import build_mime, new_message_id
from mailsvc.transports.base import Delivery, check_size

IDLE_CHECK_SECONDS = 2.0  # an idle connection older than this is checked with NOOP first
MAX_IDLE_SECONDS = 60.0  # and one idle longer than this is closed rather than reused


@dataclass(frozen=True, kw_only=True)
class SmtpAccount:
    host: str
    port: int = 0
    login: str = ""
    password: str = ""
    start_tls_required: bool = False
    ssl_on_connect: bool = False

    @property
    def effective_port(self) -> int:
        if self.port:
            return self.port
        if self.ssl_on_connect:
            return 465
        return 587 if self.start_tls_required else 25


def _reply_error(code: int, what: str) -> MailsvcError:
    if code == 552:
        return ResourceExhausted(
            f"the SMTP server refused the message as too large ({code})",
            reason="MESSAGE_TOO_LARGE",
        )
    if 400 <= code < 500:
        return Unavailable(
            f"the SMTP server answered {code} (temporary) to {what}", reason="SMTP_UNAVAILABLE"
        )
    return FailedPrecondition(f"the SMTP server rejected {what} ({code})", reason="SMTP_REJECTED")


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def may_send_credentials(account: SmtpAccount, *, tls: bool) -> bool:
    """The login goes only over TLS or to this machine, as Go's net/smtp does."""
    return tls or is_loopback_host(account.host)


def map_smtp_error(exc: Exception, *, in_data: bool = False) -> MailsvcError:
    """Turn an aiosmtplib or socket error into ours; the server's own text is not passed on.

    `in_data`: the failure came after DATA began. Unless the server answered with a refusal,
    it may have the mail, which must then never be sent again.
    """
    tls_error = _tls_failure(exc)
    if isinstance(tls_error, ssl.SSLCertVerificationError):
        return FailedPrecondition(
            "the SMTP server's TLS certificate or host name did not verify",
            reason="TLS_VERIFY_FAILED",
        )
    if tls_error is not None:
        return FailedPrecondition("TLS with the SMTP server failed", reason="SMTP_TLS_FAILED")
    if in_data and not isinstance(exc, aiosmtplib.SMTPResponseException):
        return DeliveryUncertain(
            "the connection to the SMTP server failed during DATA; the mail may have been "
            "delivered, so it is not sent again"
        )
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        if 400 <= exc.code < 500:
            return Unavailable("SMTP authentication failed temporarily", reason="SMTP_UNAVAILABLE")
        return FailedPrecondition(
            "the SMTP server refused our credentials", reason="SMTP_AUTH_FAILED"
        )
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        transient = bool(codes) and all(400 <= c < 500 for c in codes)
        return _reply_error(codes[0] if transient else 550, "every recipient")
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return FailedPrecondition(
            "the SMTP server does not support what the settings ask (AUTH or TLS)",
            reason="SMTP_NOT_SUPPORTED",
        )
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 400:
        return _reply_error(exc.code, "the message")
    return Unavailable("the SMTP server is unreachable or timed out", reason="SMTP_UNAVAILABLE")


# MAIL and RCPT as aiosmtplib's mail() and rcpt() send them, minus their parse of each address
# with email.utils (a third of such a command's CPU): ours are checked ASCII addr-specs already.


async def _mail_from(client: aiosmtplib.SMTP, sender: str) -> None:
    reply = await client.execute_command(
        b"MAIL", b"FROM:<%s>" % sender.encode("ascii"), timeout=None
    )
    if reply.code != aiosmtplib.SMTPStatus.completed:
        raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, sender)


async def _rcpt_to(client: aiosmtplib.SMTP, recipient: str) -> None:
    reply = await client.execute_command(
        b"RCPT", b"TO:<%s>" % recipient.encode("ascii"), timeout=None
    )
    if reply.code not in (aiosmtplib.SMTPStatus.completed, aiosmtplib.SMTPStatus.will_forward):
        raise aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, recipient)


class _Connection:
    def __init__(self, client: aiosmtplib.SMTP) -> None:
        self.client = client
        self.last_used = time.monotonic()


class SmtpTransport:
    """Sends over at most `pool_size` reused connections (0: a new connection per mail).

    Errors before DATA leave nothing sent, so they may be retried; a connection lost during
    DATA is not, since the server may have taken the mail.
    """

    name = "smtp"

    def __init__(
        self,
        account: SmtpAccount,
        *,
        max_message_bytes: int,
        timeout: float,
        pool_size: int = 4,
        signer: DkimSigner | None = None,
    ) -> None:
        self._account = account
        self._signer = signer
        self._max_bytes = max_message_bytes
        self._timeout = timeout
        self._pool_size = pool_size
        self._slots = asyncio.Semaphore(pool_size) if pool_size > 0 else None
        self._idle: deque[_Connection] = deque()
        self._closed = False
        self._tls = ssl.create_default_context()
        self._local_hostname = socket.gethostname() or "localhost"
        self.in_use = 0

    async def _connect(self, timeout: float) -> aiosmtplib.SMTP:
        account = self._account
        client = aiosmtplib.SMTP(
            hostname=account.host,
            port=account.effective_port,
            use_tls=account.ssl_on_connect,
            start_tls=False,
            tls_context=self._tls,
            local_hostname=self._local_hostname,
            timeout=timeout,
        )
        await client.connect()
        try:
            await client.ehlo()
            tls = account.ssl_on_connect
            if not tls:
                if client.supports_extension("starttls"):
                    await client.starttls(tls_context=self._tls)
                    await client.ehlo()  # RFC 3207: what the server offers may change under TLS
                    tls = True
                elif account.start_tls_required:
                    raise FailedPrecondition(
                        "the SMTP server does not offer STARTTLS, which the settings require",
                        reason="STARTTLS_NOT_OFFERED",
                    )
            if account.login:
                if not may_send_credentials(account, tls=tls):
                    raise FailedPrecondition(
                        "the SMTP server offers no TLS, and the login is sent only over TLS "
                        "(or to a loopback host)",
                        reason="AUTH_WITHOUT_TLS",
                    )
                await client.login(account.login, account.password)
        except BaseException:
            client.close()
            raise
        return client

    async def _reusable(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            idle_for = time.monotonic() - conn.last_used
            if conn.client.is_connected and idle_for < MAX_IDLE_SECONDS:
                if idle_for < IDLE_CHECK_SECONDS:
                    return conn
                try:
                    await conn.client.noop()
                    return conn
                except (aiosmtplib.SMTPException, OSError):
                    pass
            conn.client.close()
        return None

    @asynccontextmanager
    async def _connection(self, timeout: float) -> AsyncIterator[_Connection]:
        async with self._pooled_or_fresh(timeout) as conn:
            self.in_use += 1
            try:
                yield conn
            finally:
                self.in_use -= 1

    @asynccontextmanager
    async def _pooled_or_fresh(self, timeout: float) -> AsyncIterator[_Connection]:
        if self._slots is None:
            conn = _Connection(await self._connect(timeout))
            try:
                yield conn
            finally:
                await self._quit(conn)
            return
        async with self._slots:
            conn = await self._reusable() or _Connection(await self._connect(timeout))
            healthy = False
            try:
                yield conn
                healthy = True
            finally:
                if healthy and not self._closed and conn.client.is_connected:
                    conn.last_used = time.monotonic()
                    self._idle.append(conn)
                else:
                    conn.client.close()

    async def _quit(self, conn: _Connection) -> None:
        try:
            await conn.client.quit()
        except (aiosmtplib.SMTPException, OSError):
            conn.client.close()

    async def send(self, mail: Mail, *, timeout: float, message_id: str = "") -> Delivery:
        message_id = message_id or new_message_id(mail.sender)
        raw = build_mime(mail, message_id)
        if self._signer is not None:
            # Signed last, over the very bytes DATA sends.
            raw = self._signer.sign(raw)
        check_size(len(raw), self._max_bytes)
        timeout = min(timeout, self._timeout)
        in_data = False
        # Commands carry no timer of their own: the caller's deadline (Mailer) bounds the
        # whole send, and a timer per command is a measurable cost.
        try:
            async with self._connection(timeout) as conn:
                client = conn.client
                try:
                    await _mail_from(client, mail.sender.addr)
                    refused: list[aiosmtplib.SMTPRecipientRefused] = []
                    accepted = []
                    for rcpt in mail.recipients:
                        try:
                            await _rcpt_to(client, rcpt)
                            accepted.append(rcpt)
                        except aiosmtplib.SMTPRecipientRefused as exc:
                            refused.append(exc)
                    if not accepted:
                        raise aiosmtplib.SMTPRecipientsRefused(refused)
                    in_data = True
                    await client.data(raw, timeout=None)
                except aiosmtplib.SMTPResponseException:
                    # Leave the connection clean for whoever closes it; the refusal is what
                    # the caller needs to hear about.
                    with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                        await client.rset(timeout=timeout)
                    raise
        except MailsvcError:
            raise
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise map_smtp_error(exc, in_data=in_data) from exc
        return Delivery(message_id, self.name, accepted)

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            await self._quit(self._idle.pop())
