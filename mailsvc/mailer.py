"""Delivery: pick the transport, retry what is transient, fail over, bound sends in flight."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from mailsvc.config import Config
from mailsvc.dkim import DkimSigner
from mailsvc.errors import DeadlineExceeded, FailedPrecondition, MailsvcError, ResourceExhausted
from mailsvc.message import Mail
from mailsvc.metrics import Metrics
from mailsvc.store import Snapshot
from mailsvc.transports.base import Delivery, Transport
from mailsvc.transports.maildir import MaildirTransport
from mailsvc.transports.mailgun import (
    REGION_URLS,
    MailgunAccount,
    MailgunTransport,
    new_http_client,
)
from mailsvc.transports.smtp import SmtpAccount, SmtpTransport
from mailsvc.v1.settings_pb2 import MailSettings, Region

log = logging.getLogger(__name__)
BACKOFF_BASE = 0.1
BACKOFF_CAP = 2.0
QUEUE_MARGIN = 0.05  # give up waiting for a send slot this long before the caller's deadline


@dataclass(eq=False)
class _Version:
    """The transports of one settings version, and the sends using them."""

    transports: list[Transport]
    users: int = 0
    retired: bool = False  # a newer version exists: close once no send uses these
    closing: bool = False


class Mailer:
    """Owns the transports built from the settings and the shared HTTP client.

    Transports are kept per settings version (etag). A send uses the transports of the
    snapshot it was given; a version is closed once a newer one is in use and no send uses
    it any more, so a send holding an older snapshot never closes newer transports.
    """

    def __init__(
        self, config: Config, metrics: Metrics, *, current_etag: Callable[[], str] | None = None
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._http = new_http_client()
        # Tells which version is the newest; without it, an etag seen first is the newest.
        self._current_etag = current_etag
        self._versions: dict[str, _Version] = {}
        self._seen: set[str] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._in_flight = asyncio.Semaphore(config.max_in_flight)
        metrics.track_pool(self._smtp_in_use)

    def _smtp_in_use(self) -> float:
        return float(
            sum(
                t.in_use
                for version in self._versions.values()
                for t in version.transports
                if isinstance(t, SmtpTransport)
            )
        )

    def _build(self, settings: MailSettings) -> list[Transport]:
        config = self._config
        limit = config.max_message_bytes
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
            signer = None
            if s.HasField("dkim"):
                # The key is parsed once per settings version, not per mail.
                signer = DkimSigner.from_settings(
                    s.dkim.domain, s.dkim.selector, s.dkim.private_key
                )
            transports.append(
                SmtpTransport(
                    account,
                    max_message_bytes=limit,
                    timeout=config.smtp_timeout,
                    pool_size=config.smtp_pool_size,
                    signer=signer,
                )
            )
        if settings.HasField("mailgun"):
            m = settings.mailgun
            region = "EU" if m.region == Region.EU else "US"
            base = config.mailgun_base_url or REGION_URLS[region]
            account_mg = MailgunAccount(domain=m.domain, key=m.key, base_url=base)
            transports.append(MailgunTransport(account_mg, self._http, max_message_bytes=limit))
        if not transports and config.dev:
            transports.append(MaildirTransport(config.outbox_dir, max_message_bytes=limit))
        return transports

    def _is_newest(self, etag: str) -> bool:
        if self._current_etag is not None:
            return etag == self._current_etag()
        return etag not in self._seen

    @contextmanager
    def _transports(self, snapshot: Snapshot) -> Iterator[list[Transport]]:
        """The transports of this snapshot's settings version, held for one send."""
        etag = snapshot.etag
        version = self._versions.get(etag)
        if version is None:
            newest = self._is_newest(etag)
            self._seen.add(etag)
            version = _Version(self._build(snapshot.settings), retired=not newest)
            self._versions[etag] = version
            if newest:
                for other_etag, other in list(self._versions.items()):
                    if other_etag != etag:
                        other.retired = True
                        self._close_if_unused(other_etag, other)
        version.users += 1
        try:
            yield version.transports
        finally:
            version.users -= 1
            self._close_if_unused(etag, version)

    def _close_if_unused(self, etag: str, version: _Version) -> None:
        if not version.retired or version.users or version.closing:
            return
        version.closing = True
        if self._versions.get(etag) is version:
            del self._versions[etag]
        task = asyncio.get_running_loop().create_task(self._close(version))
        self._closing.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._closing.discard)

    async def _close(self, version: _Version) -> None:
        for transport in version.transports:
            try:
                await transport.aclose()
            except Exception:
                log.exception("closing the %s transport failed", transport.name)

    @asynccontextmanager
    async def _slot(self, deadline: float) -> AsyncIterator[None]:
        wait = deadline - asyncio.get_running_loop().time() - QUEUE_MARGIN
        try:
            if self._in_flight.locked():
                async with asyncio.timeout(max(wait, 0)):
                    await self._in_flight.acquire()
            else:
                await self._in_flight.acquire()  # free now: no need to arm a timer
        except TimeoutError:
            raise ResourceExhausted(
                "too many mails in flight to start this one before the deadline",
                reason="TOO_MANY_IN_FLIGHT",
            ) from None
        try:
            yield
        finally:
            self._in_flight.release()

    async def send(
        self, snapshot: Snapshot, mail: Mail, *, timeout: float | None, message_id: str = ""
    ) -> Delivery:
        """Hand the mail to one transport, within the caller's deadline.

        Transient failures are retried with backoff; when they persist, the next configured
        transport is tried. A failure that may have delivered the mail is never retried.
        """
        with self._transports(snapshot) as transports:
            return await self._send(transports, mail, timeout, message_id)

    async def _send(
        self, transports: list[Transport], mail: Mail, timeout: float | None, message_id: str
    ) -> Delivery:
        if not transports:
            raise FailedPrecondition("no mail transport configured", reason="NO_TRANSPORT")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else self._config.send_timeout)
        async with self._slot(deadline):
            for i, transport in enumerate(transports):
                try:
                    delivery = await self._with_retries(transport, mail, deadline, message_id)
                except MailsvcError as exc:
                    exc.transport = transport.name
                    self._metrics.sends.labels(transport.name, exc.reason).inc()
                    if not exc.transient or i == len(transports) - 1:
                        raise
                    self._metrics.failovers.labels(transport.name, transports[i + 1].name).inc()
                    log.warning(
                        "%s failed (%s); failing over to %s",
                        transport.name,
                        exc.reason,
                        transports[i + 1].name,
                    )
                else:
                    self._metrics.sends.labels(transport.name, "ok").inc()
                    return delivery
        raise AssertionError("unreachable")

    async def _with_retries(
        self, transport: Transport, mail: Mail, deadline: float, message_id: str
    ) -> Delivery:
        loop = asyncio.get_running_loop()
        attempts = self._config.send_attempts
        for attempt in range(attempts):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded("the deadline passed before the mail could be handed over")
            try:
                async with asyncio.timeout(remaining):
                    return await transport.send(mail, timeout=remaining, message_id=message_id)
            except TimeoutError:
                raise DeadlineExceeded(
                    "the mail could not be handed over before the deadline"
                ) from None
            except MailsvcError as exc:
                if not exc.transient or attempt == attempts - 1:
                    raise
                delay = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt) * random.uniform(0.5, 1.5)
                if loop.time() + delay >= deadline:
                    raise
                self._metrics.retries.labels(transport.name).inc()
                log.info(
                    "%s: %s, retry %d in %.2fs", transport.name, exc.reason, attempt + 1, delay
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        versions = list(self._versions.values())
        self._versions.clear()
        for version in versions:
            if not version.closing:
                version.closing = True
                await self._close(version)
        if self._closing:
            await asyncio.gather(*self._closing)
        await self._http.aclose()
