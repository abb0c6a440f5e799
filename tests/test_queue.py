"""Queue workers over the SQLite store, handing mail to a real aiosmtpd sink with the real
SMTP transport: delivery, retries, permanent and uncertain failures, expiry, shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from mailsvc import payload
from mailsvc.addresses import Address
from mailsvc.lifecycle import RetryPolicy
from mailsvc.message import Mail
from mailsvc.mime import new_message_id
from mailsvc.queue import Attempt, QueueWorkers
from mailsvc.storage.base import MessageRecord, NewMessage, Status
from mailsvc.storage.sqlite import FILE_NAME, SqliteStorage
from mailsvc.transports.base import Delivery
from mailsvc.transports.smtp import SmtpAccount, SmtpTransport
from tests.conftest import SinkHandler, SmtpSink, free_port

pytestmark = pytest.mark.anyio
FAST = RetryPolicy(initial=0.2, maximum=0.4, max_age=60)


class DropDuringData(SinkHandler):
    """Takes the whole mail, then hangs up instead of answering: the sender cannot know."""

    data_commands = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.data_commands += 1
        server.transport.close()
        return "250 OK"


class SlowSink(SinkHandler):
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(1.0)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def sink_with() -> Iterator[Callable[[SinkHandler], SmtpSink]]:
    controllers: list[Controller] = []

    def start(handler: SinkHandler) -> SmtpSink:
        port = free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=port)
        controller.start()
        controllers.append(controller)
        return SmtpSink("127.0.0.1", port, handler, controller)

    yield start
    for controller in controllers:
        controller.stop()


@dataclass
class Env:
    storage: SqliteStorage
    sink: SmtpSink
    transport: SmtpTransport

    async def send(self, attempt: Attempt) -> Delivery:
        return await self.transport.send(attempt.mail, timeout=attempt.timeout)

    def workers(self, **kw: Any) -> QueueWorkers:
        kw.setdefault("policy", FAST)
        kw.setdefault("owner", "test")
        return QueueWorkers(self.storage, self.send, **kw)

    async def queue(
        self, id: str, *, send_at: float | None = None, to: str = "bob@example.org"
    ) -> None:
        now = time.time()
        sender = Address("Shop", "shop@example.org")
        mail = Mail(sender=sender, to=(Address("", to),), subject=f"mail {id}", text="hello")
        header = new_message_id(sender)
        await self.storage.insert(
            [
                NewMessage(
                    id=id,
                    caller="alice",
                    status=Status.SCHEDULED if send_at else Status.QUEUED,
                    to=(to,),
                    subject=mail.subject,
                    create_time=now,
                    send_time=send_at or now,
                    payload=payload.encode(mail, header),
                    header_message_id=header,
                )
            ]
        )

    async def until(
        self, id: str, check: Callable[[MessageRecord], bool], timeout: float = 15
    ) -> MessageRecord:
        deadline = time.monotonic() + timeout
        while True:
            record = await self.storage.get(id)
            assert record is not None
            if check(record):
                return record
            assert time.monotonic() < deadline, record
            await asyncio.sleep(0.02)


@pytest.fixture
async def env_with(
    tmp_path: Path, sink_with: Callable[[SinkHandler], SmtpSink]
) -> AsyncIterator[Callable[[SinkHandler], Awaitable[Env]]]:
    made: list[Env] = []

    async def make(handler: SinkHandler) -> Env:
        sink = sink_with(handler)
        storage = SqliteStorage(tmp_path / FILE_NAME)
        await storage.open()
        account = SmtpAccount(host=sink.host, port=sink.port)
        transport = SmtpTransport(account, max_message_bytes=10**7, timeout=10, pool_size=0)
        env = Env(storage, sink, transport)
        made.append(env)
        return env

    yield make
    for env in made:
        await env.transport.aclose()
        await env.storage.aclose()


async def _received(sink: SmtpSink, count: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while len(sink.received) < count:
        assert time.monotonic() < deadline, f"{len(sink.received)} of {count} arrived"
        await asyncio.sleep(0.02)


def final(record: MessageRecord) -> bool:
    return record.status in (Status.SENT, Status.FAILED)


async def test_a_queued_mail_is_delivered_in_the_background(env_with: Any) -> None:
    env: Env = await env_with(SinkHandler())
    workers = env.workers()
    workers.start()
    try:
        await env.queue("m1")
        workers.wake()
        record = await env.until("m1", final)
        assert record.status is Status.SENT and record.transport == "smtp"
        assert record.message_id and record.attempts == 1
        assert [e.status for e in record.events] == [Status.QUEUED, Status.SENDING, Status.SENT]
        [got] = env.sink.received
        assert got.rcpt_tos == ["bob@example.org"] and got.message["Subject"] == "mail m1"
        assert got.message["Message-ID"] == record.message_id
    finally:
        await workers.aclose(5)


async def test_a_mail_queued_before_start_and_a_scheduled_one_are_sent_when_due(
    env_with: Any,
) -> None:
    env: Env = await env_with(SinkHandler())
    await env.queue("early")
    send_at = time.time() + 1.5
    await env.queue("later", send_at=send_at)
    workers = env.workers()
    workers.start()  # no wake(): the workers find due work, then sleep until the next due
    try:
        await env.until("early", final)
        assert (await env.storage.get("later")).status is Status.SCHEDULED  # type: ignore[union-attr]
        record = await env.until("later", final)
        assert record.status is Status.SENT
        sent_at = record.events[-1].time
        assert send_at <= sent_at < send_at + 1.0
    finally:
        await workers.aclose(5)


async def test_451_is_retried_later_then_sent(env_with: Any) -> None:
    handler = SinkHandler()
    handler.data_replies = ["451 try later"]
    env: Env = await env_with(handler)
    workers = env.workers()
    workers.start()
    try:
        await env.queue("m")
        workers.wake()
        record = await env.until("m", final)
        assert record.status is Status.SENT and record.attempts == 2
        statuses = [e.status for e in record.events]
        assert statuses == [
            Status.QUEUED,
            Status.SENDING,
            Status.QUEUED,
            Status.SENDING,
            Status.SENT,
        ]
        retry = record.events[2]
        assert "451" in retry.detail and "next attempt at" in retry.detail
        assert record.events[3].time - retry.time >= FAST.initial * 0.8 - 0.01
        assert len(env.sink.received) == 1
    finally:
        await workers.aclose(5)


async def test_a_rescheduled_mail_shows_its_next_attempt(env_with: Any) -> None:
    handler = SinkHandler()
    handler.data_replies = ["451 try later"]
    env: Env = await env_with(handler)
    workers = env.workers(policy=RetryPolicy(initial=30, maximum=60, max_age=3600))
    workers.start()
    try:
        await env.queue("m")
        workers.wake()
        record = await env.until("m", lambda r: r.status is Status.QUEUED and r.attempts == 1)
        assert record.next_attempt_time is not None
        assert 24 <= record.next_attempt_time - record.update_time <= 36
        assert record.last_error_reason == "SMTP_UNAVAILABLE"
        assert "451" in record.last_error
    finally:
        await workers.aclose(5)


async def test_550_fails_at_once(env_with: Any) -> None:
    handler = SinkHandler()
    handler.data_replies = ["550 no such user"]
    env: Env = await env_with(handler)
    workers = env.workers()
    workers.start()
    try:
        await env.queue("m")
        workers.wake()
        record = await env.until("m", final)
        assert record.status is Status.FAILED and record.attempts == 1
        assert record.last_error_reason == "SMTP_REJECTED"
        assert record.next_attempt_time is None
        await asyncio.sleep(FAST.maximum * 2)  # nothing more happens to it
        again = await env.storage.get("m")
        assert again is not None and again.attempts == 1 and again.status is Status.FAILED
    finally:
        await workers.aclose(5)


async def test_a_connection_lost_after_data_is_never_retried(env_with: Any) -> None:
    handler = DropDuringData()
    env: Env = await env_with(handler)
    workers = env.workers()
    workers.start()
    try:
        await env.queue("m")
        workers.wake()
        record = await env.until("m", final)
        assert record.status is Status.FAILED
        assert record.last_error_reason == "DELIVERY_UNCERTAIN"
        await asyncio.sleep(FAST.maximum * 2)
        assert handler.data_commands == 1  # handed over once, whatever happened to it
        again = await env.storage.get("m")
        assert again is not None and again.attempts == 1
    finally:
        await workers.aclose(5)


async def test_a_mail_not_sent_within_the_max_age_fails(env_with: Any) -> None:
    handler = SinkHandler()
    handler.data_replies = ["451 try later"] * 100
    env: Env = await env_with(handler)
    workers = env.workers(policy=RetryPolicy(initial=0.2, maximum=0.4, max_age=1.0))
    workers.start()
    try:
        await env.queue("m")
        workers.wake()
        record = await env.until("m", final)
        assert record.status is Status.FAILED and record.attempts >= 2
        assert "not sent within 1 s" in record.events[-1].detail
        assert record.events[-1].time - record.send_time <= 1.0 + 0.5
        assert env.sink.received == []
    finally:
        await workers.aclose(5)


async def test_shutdown_finishes_attempts_in_flight_and_leaves_the_rest_queued(
    env_with: Any,
) -> None:
    env: Env = await env_with(SlowSink())
    for i in range(6):
        await env.queue(f"m{i}")
    workers = env.workers(workers=2)
    workers.start()
    await env.until("m0", lambda r: r.status is Status.SENDING)
    await env.until("m1", lambda r: r.status is Status.SENDING)
    await workers.aclose(10)
    records = [await env.storage.get(f"m{i}") for i in range(6)]
    statuses = [r.status for r in records if r is not None]
    assert statuses[:2] == [Status.SENT, Status.SENT]
    assert statuses[2:] == [Status.QUEUED] * 4
    assert len(env.sink.received) == 2
    # The next start delivers the rest.
    workers = env.workers(workers=4)
    workers.start()
    try:
        for i in range(2, 6):
            assert (await env.until(f"m{i}", final)).status is Status.SENT
        await _received(env.sink, 6)
    finally:
        await workers.aclose(5)


async def test_attempts_in_flight_are_bounded_by_workers(env_with: Any) -> None:
    env: Env = await env_with(SlowSink())
    for i in range(5):
        await env.queue(f"m{i}")
    workers = env.workers(workers=2)
    workers.start()
    try:
        peak = 0
        deadline = time.monotonic() + 20
        while len(env.sink.received) < 5 and time.monotonic() < deadline:
            sending = [await env.storage.get(f"m{i}") for i in range(5)]
            peak = max(peak, sum(r is not None and r.status is Status.SENDING for r in sending))
            await asyncio.sleep(0.05)
        assert len(env.sink.received) == 5
        assert peak == 2
    finally:
        await workers.aclose(5)


async def test_mail_queued_while_every_worker_is_busy_goes_when_one_is_free(
    env_with: Any,
) -> None:
    # wake() is a no-op while no worker is free: the attempt that ends must look instead
    # (else the mail would wait for the dispatcher's 30 s poll).
    env: Env = await env_with(SlowSink())
    workers = env.workers(workers=1)
    workers.start()
    try:
        await env.queue("m0")
        workers.wake()
        await env.until("m0", lambda r: r.status is Status.SENDING)
        await env.queue("m1")
        workers.wake()
        assert (await env.until("m1", final, timeout=10)).status is Status.SENT
        await _received(env.sink, 2)
    finally:
        await workers.aclose(5)
