"""SMTP transport with aiosmtplib: implicit TLS or STARTTLS (verified), AUTH, Bcc in envelope."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

import aiosmtplib

from mailsvc.errors import (
    FailedPrecondition,
    MailsvcError,
    ResourceExhausted,
    Unavailable,
)
from mailsvc.message import Mail, build_mime, new_message_id
from mailsvc.transports.base import Delivery, check_size


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


def _is_tls_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError | ssl.CertificateError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def map_smtp_error(exc: Exception) -> MailsvcError:
    """Turn an aiosmtplib or socket error into ours; the server's own text is not passed on."""
    if _is_tls_failure(exc):
        return FailedPrecondition(
            "TLS with the SMTP server failed: its certificate or host name did not verify",
            reason="SMTP_TLS_FAILED",
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
    if isinstance(exc, aiosmtplib.SMTPSenderRefused):
        return _reply_error(exc.code, "the sender")
    if isinstance(exc, aiosmtplib.SMTPDataError):
        return _reply_error(exc.code, "the message")
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return FailedPrecondition(
            "the SMTP server does not support what the settings ask (AUTH or TLS)",
            reason="SMTP_NOT_SUPPORTED",
        )
    if isinstance(exc, aiosmtplib.SMTPConnectError | aiosmtplib.SMTPTimeoutError | OSError):
        return Unavailable("the SMTP server is unreachable or timed out", reason="SMTP_UNAVAILABLE")
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return Unavailable("the SMTP server closed the connection", reason="SMTP_UNAVAILABLE")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _reply_error(exc.code, "a command")
    return Unavailable("sending through SMTP failed", reason="SMTP_UNAVAILABLE")


class SmtpTransport:
    """Opens a connection per mail; TLS always verifies against the system trust store."""

    name = "smtp"

    def __init__(self, account: SmtpAccount, *, max_message_bytes: int, timeout: float) -> None:
        self._account = account
        self._max_bytes = max_message_bytes
        self._timeout = timeout
        self._tls = ssl.create_default_context()
        self._local_hostname = socket.gethostname() or "localhost"

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
            if not account.ssl_on_connect:
                if client.supports_extension("starttls"):
                    await client.starttls(tls_context=self._tls)
                elif account.start_tls_required:
                    raise FailedPrecondition(
                        "the SMTP server does not offer STARTTLS, which the settings require",
                        reason="STARTTLS_NOT_OFFERED",
                    )
            if account.login:
                await client.login(account.login, account.password)
        except BaseException:
            client.close()
            raise
        return client

    async def send(self, mail: Mail, *, timeout: float) -> Delivery:
        message_id = new_message_id(mail.sender)
        raw = build_mime(mail, message_id)
        check_size(len(raw), self._max_bytes)
        timeout = min(timeout, self._timeout)
        try:
            client = await self._connect(timeout)
            try:
                refused, _ = await client.sendmail(mail.sender.addr, mail.recipients, raw)
            finally:
                try:
                    await client.quit()
                except (aiosmtplib.SMTPException, OSError):
                    client.close()
        except MailsvcError:
            raise
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise map_smtp_error(exc) from exc
        accepted = [r for r in mail.recipients if r not in refused]
        return Delivery(message_id, self.name, accepted)

    async def aclose(self) -> None:
        return None
