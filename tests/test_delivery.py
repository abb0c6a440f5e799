"""Delivery guarantees, end to end: idempotency, retries, failover, the SMTP pool, drain, crashes.

The real server runs as a subprocess; the SMTP servers (aiosmtpd) and the Mailgun stand-in run
in this process on 127.0.0.1 and misbehave on purpose: they refuse, answer 4xx/5xx, go slow,
and count what they see (connections, DATA commands, HTTP requests).
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health_pb2
from mailsvc.v1 import mail_pb2, mail_pb2_grpc, settings_pb2

from tests.conftest import (
    ADMIN,
    MAILGUN_KEY,
    SUPERADMIN,
    MailgunStandIn,
    Received,
    Server,
    auth,
    details,
    free_port,
    make_token,
    start_server,
)

ServerFactory = Callable[..., Server]
Metadata = list[tuple[str, str]]

SENDER = "sender@example.com"
RCPT = "rcpt@example.com"
DOMAIN = "mg.example.com"
TRY_LATER = "451 4.7.1 try later"
REFUSED = "550 5.7.1 refused"
# Another admin and another superadmin: same roles, different `sub`.
OTHER_ADMIN = auth(make_token(["admin"], sub="ops-2"))
OTHER_ROOT = auth(make_token(["superadmin"], sub="root-2"))


# --- an SMTP server that counts what it sees ---------------------------------------------------


class CountingHandler:
    """Counts DATA commands, answers them from a script, may be slow, keeps what it accepts."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.replies: list[str] = []  # consumed one per DATA; empty = accept
        self.always: str | None = None  # answer every DATA with this, accept nothing
        self.received: list[Received] = []
        self.data_commands = 0
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.data_commands += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        with self.lock:
            if self.always is not None:
                return self.always
            if self.replies:
                return self.replies.pop(0)
            self.received.append(
                Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.content))
            )
        return "250 OK"


class ConnectionCounter:
    def __init__(self) -> None:
        self.armed = False  # the controller's own start-up probe is not counted
        self.opened = 0
        self.open_now = 0
        self.max_open = 0
        self.lock = threading.Lock()


class CountingSMTP(SMTP):  # type: ignore[misc]
    def __init__(self, handler: Any, counter: ConnectionCounter, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._counter = counter
        self._counted = counter.armed

    def connection_made(self, transport: Any) -> None:
        if self._counted:
            c = self._counter
            with c.lock:
                c.opened += 1
                c.open_now += 1
                c.max_open = max(c.max_open, c.open_now)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            with self._counter.lock:
                self._counter.open_now -= 1
        super().connection_lost(error)


class CountingController(Controller):  # type: ignore[misc]
    def __init__(self, handler: Any, counter: ConnectionCounter, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.counter = counter

    def factory(self) -> CountingSMTP:
        return CountingSMTP(self.handler, self.counter, **self.SMTP_kwargs)


@dataclass
class Sink:
    host: str
    port: int
    handler: CountingHandler
    counter: ConnectionCounter
    controller: CountingController

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    def smtp(self) -> settings_pb2.SmtpSettings:
        return settings_pb2.SmtpSettings(host=self.host, port=self.port)

    def wait_for(self, count: int, timeout: float = 10) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.received

    def wait_data(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.handler.data_commands < count:
            assert time.monotonic() < deadline, "the sink never saw the DATA commands"
            time.sleep(0.01)


SinkFactory = Callable[..., Sink]


@pytest.fixture
def sink_factory() -> Iterator[SinkFactory]:
    sinks: list[Sink] = []

    def factory(delay: float = 0.0) -> Sink:
        handler = CountingHandler(delay)
        counter = ConnectionCounter()
        port = free_port()
        controller = CountingController(handler, counter, hostname="127.0.0.1", port=port)
        controller.start()
        counter.armed = True
        sink = Sink("127.0.0.1", port, handler, counter, controller)
        sinks.append(sink)
        return sink

    yield factory
    for sink in sinks:
        sink.controller.stop()


@pytest.fixture
def sink(sink_factory: SinkFactory) -> Sink:
    return sink_factory()


# --- one server shared by the tests that need no flags of their own --------------------------


@pytest.fixture(scope="module")
def shared_mailgun() -> Iterator[MailgunStandIn]:
    stand_in = MailgunStandIn()
    yield stand_in
    stand_in.close()


@pytest.fixture(scope="module")
def shared_server(
    tmp_path_factory: pytest.TempPathFactory, shared_mailgun: MailgunStandIn
) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("delivery") / "data"
    server = start_server(data_dir, "--mailgun-base-url", shared_mailgun.base_url)
    yield server
    if server.proc.poll() is None:
        server.stop(signal.SIGKILL)


@pytest.fixture
def mailgun(shared_mailgun: MailgunStandIn) -> MailgunStandIn:
    """The shared stand-in, with a clean slate for this test."""
    shared_mailgun.requests.clear()
    shared_mailgun.statuses.clear()
    shared_mailgun.always = None
    shared_mailgun.hang_up = False
    return shared_mailgun


def mailgun_settings() -> settings_pb2.MailgunSettings:
    return settings_pb2.MailgunSettings(domain=DOMAIN, key=MAILGUN_KEY)


def configure(
    server: Server,
    sink: Sink | None = None,
    *,
    smtp: settings_pb2.SmtpSettings | None = None,
    mailgun: bool = False,
    templates: dict[str, settings_pb2.MailTemplate] | None = None,
) -> None:
    settings = settings_pb2.MailSettings(default_from=SENDER, templates=templates or {})
    if sink is not None:
        settings.smtp.CopyFrom(sink.smtp())
    if smtp is not None:
        settings.smtp.CopyFrom(smtp)
    if mailgun:
        settings.mailgun.CopyFrom(mailgun_settings())
    server.put_settings(settings)


def key() -> str:
    return f"key-{uuid.uuid4()}"


def request(text: str = "Hello", **fields: Any) -> mail_pb2.SendMailRequest:
    values: dict[str, Any] = {"to": [RCPT], "subject": "Delivery", "text": text}
    values.update(fields)
    return mail_pb2.SendMailRequest(**values)


def send(
    server: Server,
    req: mail_pb2.SendMailRequest,
    *,
    metadata: Metadata = ADMIN,
    timeout: float = 10,
) -> mail_pb2.SendMailResponse:
    response: mail_pb2.SendMailResponse = server.mail.SendMail(
        req, metadata=metadata, timeout=timeout
    )
    return response


def send_fails(
    server: Server,
    req: mail_pb2.SendMailRequest,
    *,
    metadata: Metadata = ADMIN,
    timeout: float = 10,
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        server.mail.SendMail(req, metadata=metadata, timeout=timeout)
    return caught.value


def message_id_header(received: Received) -> str:
    msg = email.message_from_bytes(received.raw, policy=email.policy.default)
    return str(msg["Message-ID"])


def text_of(received: Received) -> str:
    msg = email.message_from_bytes(received.raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    part = msg.get_body(("plain",))
    assert isinstance(part, email.message.EmailMessage)
    return str(part.get_content()).strip()


# --- 1. idempotency ----------------------------------------------------------------------------


def test_same_key_twice_sends_once(shared_server: Server, sink: Sink) -> None:
    configure(shared_server, sink)
    req = request(idempotency_key=key())
    first = send(shared_server, req)
    second = send(shared_server, req)
    assert second == first
    assert first.transport == "smtp"
    assert len(sink.wait_for(1)) == 1
    time.sleep(0.2)
    assert len(sink.received) == 1
    assert sink.handler.data_commands == 1
    assert message_id_header(sink.received[0]) == first.message_id


def test_same_key_across_a_restart_sends_once(server_factory: ServerFactory, sink: Sink) -> None:
    server = server_factory()
    configure(server, sink)
    req = request(idempotency_key=key())
    first = send(server, req)
    assert server.stop(signal.SIGTERM, timeout=15) == 0
    restarted = server_factory(data_dir=server.data_dir)
    second = send(restarted, req)
    assert second == first
    time.sleep(0.2)
    assert len(sink.received) == 1
    assert sink.handler.data_commands == 1


def test_same_key_twice_at_once_sends_once(
    shared_server: Server, sink_factory: SinkFactory
) -> None:
    slow = sink_factory(delay=1.0)
    configure(shared_server, slow)
    req = request(idempotency_key=key())
    calls = [shared_server.mail.SendMail.future(req, metadata=ADMIN, timeout=10) for _ in range(2)]
    responses = [call.result() for call in calls]
    assert responses[0].message_id
    assert responses[0] == responses[1]
    time.sleep(0.2)
    assert len(slow.received) == 1
    assert slow.handler.data_commands == 1
    assert message_id_header(slow.received[0]) == responses[0].message_id


def test_caller_gone_mid_send_still_records_the_key(
    shared_server: Server, sink_factory: SinkFactory
) -> None:
    """A caller that hangs up during DATA retries: the mail went out once, and the retry
    gets its response instead of a second mail."""
    slow = sink_factory(delay=1.0)
    configure(shared_server, slow)
    req = request(idempotency_key=key())
    first = shared_server.mail.SendMail.future(req, metadata=ADMIN, timeout=10)
    slow.wait_data(1)
    first.cancel()
    retry = send(shared_server, req)
    time.sleep(0.2)
    assert len(slow.received) == 1
    assert slow.handler.data_commands == 1
    assert message_id_header(slow.received[0]) == retry.message_id


def test_same_key_of_another_caller_is_its_own_send(shared_server: Server, sink: Sink) -> None:
    configure(shared_server, sink)
    req = request(idempotency_key=key())
    mine = send(shared_server, req, metadata=ADMIN)
    theirs = send(shared_server, req, metadata=OTHER_ADMIN)
    assert mine.message_id != theirs.message_id
    assert len(sink.wait_for(2)) == 2
    # Each caller's repeat still gets its own first response.
    assert send(shared_server, req, metadata=ADMIN) == mine
    assert send(shared_server, req, metadata=OTHER_ADMIN) == theirs
    time.sleep(0.2)
    assert len(sink.received) == 2


def test_same_key_with_another_body_is_invalid(shared_server: Server, sink: Sink) -> None:
    configure(shared_server, sink)
    k = key()
    send(shared_server, request("first body", idempotency_key=k))
    err = send_fails(shared_server, request("another body", idempotency_key=k))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "idempotency_key" in details(err)["violations"], details(err)
    time.sleep(0.2)
    assert len(sink.received) == 1
    assert sink.handler.data_commands == 1


HELLO = settings_pb2.MailTemplate(
    to=[RCPT], subject="Hi {{ name }}", text="Hello {{ name }}", model={"name": "string"}
)


def templated(name: str, idempotency_key: str) -> mail_pb2.SendTemplatedMailRequest:
    params = struct_pb2.Struct()
    params.update({"name": name})
    return mail_pb2.SendTemplatedMailRequest(
        template_name="hello", parameters=params, idempotency_key=idempotency_key
    )


def send_templated(
    server: Server, req: mail_pb2.SendTemplatedMailRequest, metadata: Metadata = SUPERADMIN
) -> mail_pb2.SendMailResponse:
    response: mail_pb2.SendMailResponse = server.mail.SendTemplatedMail(
        req, metadata=metadata, timeout=10
    )
    return response


def test_templated_mail_is_idempotent_too(shared_server: Server, sink: Sink) -> None:
    configure(shared_server, sink, templates={"hello": HELLO})
    k = key()
    first = send_templated(shared_server, templated("Alice", k))
    assert send_templated(shared_server, templated("Alice", k)) == first
    time.sleep(0.2)
    assert len(sink.received) == 1
    assert message_id_header(sink.received[0]) == first.message_id

    # Same key, other parameters: refused, nothing sent.
    with pytest.raises(grpc.RpcError) as caught:
        send_templated(shared_server, templated("Bob", k))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "idempotency_key" in details(caught.value)["violations"]

    # Same key, but SendMail instead of SendTemplatedMail: another request, refused too.
    err = send_fails(shared_server, request(idempotency_key=k), metadata=SUPERADMIN)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "idempotency_key" in details(err)["violations"]

    # Another caller with the same key: its own send.
    theirs = send_templated(shared_server, templated("Alice", k), metadata=OTHER_ROOT)
    assert theirs.message_id != first.message_id
    time.sleep(0.2)
    assert len(sink.received) == 2
    assert sink.handler.data_commands == 2


def test_templated_same_key_twice_at_once_sends_once(
    shared_server: Server, sink_factory: SinkFactory
) -> None:
    slow = sink_factory(delay=1.0)
    configure(shared_server, slow, templates={"hello": HELLO})
    req = templated("Alice", key())
    calls = [
        shared_server.mail.SendTemplatedMail.future(req, metadata=SUPERADMIN, timeout=10)
        for _ in range(2)
    ]
    responses = [call.result() for call in calls]
    assert responses[0].message_id
    assert responses[0] == responses[1]
    time.sleep(0.2)
    assert len(slow.received) == 1
    assert slow.handler.data_commands == 1


# --- 2. retries --------------------------------------------------------------------------------


def test_smtp_451_then_250_is_retried_once(shared_server: Server, sink: Sink) -> None:
    configure(shared_server, sink)
    sink.handler.replies = [TRY_LATER]
    response = send(shared_server, request())
    assert response.transport == "smtp"
    assert len(sink.wait_for(1)) == 1
    time.sleep(0.2)
    assert len(sink.received) == 1
    assert sink.handler.data_commands == 2
    assert message_id_header(sink.received[0]) == response.message_id


def test_smtp_550_is_not_retried(shared_server: Server, sink: Sink) -> None:
    configure(shared_server, sink)
    sink.handler.always = REFUSED
    err = send_fails(shared_server, request())
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    time.sleep(0.3)
    assert sink.handler.data_commands == 1
    assert sink.received == []


def test_mailgun_503_then_200_is_retried(shared_server: Server, mailgun: MailgunStandIn) -> None:
    configure(shared_server, mailgun=True)
    mailgun.statuses = [503]
    response = send(shared_server, request())
    assert response.transport == "mailgun"
    assert response.message_id == "<mg-2@mailgun.test>"
    assert len(mailgun.requests) == 2


def test_mailgun_429_forever_is_resource_exhausted_before_the_deadline(
    shared_server: Server, mailgun: MailgunStandIn
) -> None:
    configure(shared_server, mailgun=True)
    mailgun.always = 429
    start = time.monotonic()
    err = send_fails(shared_server, request(), timeout=5)
    elapsed = time.monotonic() - start
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
    assert elapsed < 5
    assert len(mailgun.requests) >= 2  # 429 is worth retrying


@pytest.mark.parametrize("status", [400, 401])
def test_mailgun_client_errors_are_not_retried(
    shared_server: Server, mailgun: MailgunStandIn, status: int
) -> None:
    configure(shared_server, mailgun=True)
    mailgun.always = status
    err = send_fails(shared_server, request())
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    time.sleep(0.3)
    assert len(mailgun.requests) == 1


def test_mailgun_lost_reply_is_not_retried(shared_server: Server, mailgun: MailgunStandIn) -> None:
    """A connection lost after the request went out may hide a queued mail: never resend."""
    configure(shared_server, mailgun=True)
    mailgun.hang_up = True
    err = send_fails(shared_server, request())
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    time.sleep(0.3)
    assert len(mailgun.requests) == 1


# --- 3. failover -------------------------------------------------------------------------------


def test_smtp_down_fails_over_to_mailgun(shared_server: Server, mailgun: MailgunStandIn) -> None:
    closed = settings_pb2.SmtpSettings(host="127.0.0.1", port=free_port())
    configure(shared_server, smtp=closed, mailgun=True)
    response = send(shared_server, request())
    assert response.transport == "mailgun"
    assert response.message_id == "<mg-1@mailgun.test>"
    assert len(mailgun.requests) == 1


def test_smtp_4xx_after_its_retries_fails_over_to_mailgun(
    shared_server: Server, sink: Sink, mailgun: MailgunStandIn
) -> None:
    configure(shared_server, sink, mailgun=True)
    sink.handler.always = TRY_LATER
    response = send(shared_server, request())
    assert response.transport == "mailgun"
    assert len(mailgun.requests) == 1
    assert sink.handler.data_commands == 3  # --send-attempts default
    assert sink.received == []


def test_smtp_550_is_not_handed_to_mailgun(
    shared_server: Server, sink: Sink, mailgun: MailgunStandIn
) -> None:
    configure(shared_server, sink, mailgun=True)
    sink.handler.always = REFUSED
    err = send_fails(shared_server, request())
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    time.sleep(0.3)
    assert mailgun.requests == []
    assert sink.handler.data_commands == 1


# --- 4. the SMTP connection pool ---------------------------------------------------------------


def test_200_concurrent_mails_over_a_pool_of_4(shared_server: Server, sink: Sink) -> None:
    configure(shared_server, sink)
    calls = [
        shared_server.mail.SendMail.future(request(f"mail {i}"), metadata=ADMIN, timeout=30)
        for i in range(200)
    ]
    responses = [call.result() for call in calls]
    assert len(sink.wait_for(200)) == 200
    ids = [message_id_header(r) for r in sink.received]
    assert len(set(ids)) == 200
    assert {r.message_id for r in responses} == set(ids)
    assert sorted(text_of(r) for r in sink.received) == sorted(f"mail {i}" for i in range(200))
    assert sink.counter.opened <= 4, sink.counter.opened
    assert sink.counter.max_open <= 4


def test_pool_size_0_opens_a_connection_per_mail(server_factory: ServerFactory, sink: Sink) -> None:
    server = server_factory("--smtp-pool-size", "0")
    configure(server, sink)
    for i in range(10):
        send(server, request(f"mail {i}"))
    assert len(sink.wait_for(10)) == 10
    assert sink.counter.opened == 10


# --- 5. SIGTERM drains -------------------------------------------------------------------------


def serving(server: Server) -> bool:
    try:
        reply = server.health.Check(health_pb2.HealthCheckRequest(), timeout=1)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def test_sigterm_drains_calls_in_flight(
    server_factory: ServerFactory, sink_factory: SinkFactory
) -> None:
    slow = sink_factory(delay=1.0)
    # A pool as large as the burst, so that "in flight" is something the sink can see: every
    # call is in the middle of DATA when SIGTERM arrives. (Calls that gRPC has received but not
    # yet handed to the servicer when the server stops are cancelled by grpc itself; waiting
    # for 20 DATA commands rules that race out.)
    server = server_factory("--smtp-pool-size", "20")
    configure(server, slow)
    calls = [
        server.mail.SendMail.future(request(f"mail {i}"), metadata=ADMIN, timeout=30)
        for i in range(20)
    ]
    slow.wait_data(20)
    server.proc.send_signal(signal.SIGTERM)

    deadline = time.monotonic() + 5
    while serving(server):
        assert time.monotonic() < deadline, "health never left SERVING after SIGTERM"
        time.sleep(0.02)
    time.sleep(0.2)
    with grpc.insecure_channel(server.address) as channel:
        late = mail_pb2_grpc.MailServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            late.SendMail(request("too late"), metadata=ADMIN, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()

    responses = [call.result() for call in calls]
    assert all(r.transport == "smtp" for r in responses)
    assert server.proc.wait(timeout=20) == 0, server.logs()
    assert len(slow.received) == 20
    assert b"too late" not in b"".join(r.raw for r in slow.received)


# --- 6. kill -9 while settings are written -----------------------------------------------------


def version(i: int) -> settings_pb2.MailSettings:
    big = settings_pb2.MailTemplate(to=[RCPT], subject=f"v{i}", text=f"{i} " + "x" * 50_000)
    return settings_pb2.MailSettings(
        default_from=f"v{i}@example.com", authorized_roles=[f"role-{i}"], templates={"big": big}
    )


def test_kill_9_during_settings_writes_leaves_one_whole_version(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    server.put_settings(version(0))
    calls = [
        server.settings.UpdateMailSettings.future(
            settings_pb2.UpdateMailSettingsRequest(settings=version(i)),
            metadata=SUPERADMIN,
            timeout=10,
        )
        for i in range(1, 21)
    ]
    deadline = time.monotonic() + 10
    while not any(call.done() for call in calls):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    server.proc.kill()
    assert server.proc.wait(timeout=10) == -signal.SIGKILL
    for call in calls:
        call.exception()  # settle every call; the ones cut off fail, which is expected
    server.channel.close()

    written = [json_format.MessageToDict(version(i)) for i in range(21)]
    restarted = server_factory(data_dir=server.data_dir)
    stored = json.loads((server.data_dir / "settings.json").read_text())
    stored.pop("etag", None)
    assert stored in written
    reply = restarted.settings.GetMailSettings(
        settings_pb2.GetMailSettingsRequest(), metadata=SUPERADMIN, timeout=10
    )
    assert reply.default_from == stored["defaultFrom"]


# --- deadlines ---------------------------------------------------------------------------------


def test_deadline_shorter_than_the_retries(server_factory: ServerFactory, sink: Sink) -> None:
    server = server_factory("--send-attempts", "50")
    configure(server, sink)
    sink.handler.always = TRY_LATER
    start = time.monotonic()
    err = send_fails(server, request(), timeout=1.5)
    elapsed = time.monotonic() - start
    assert err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE), (
        err.code(),
        err.details(),
    )
    assert elapsed < 2.5
    assert sink.handler.data_commands >= 2  # it did retry within the deadline
    # The server is still serving, and sends once the sink recovers.
    sink.handler.always = None
    assert serving(server)
    assert send(server, request("after")).transport == "smtp"
    assert len(sink.wait_for(1)) == 1


def test_many_callers_keep_one_idempotent_send(shared_server: Server, sink: Sink) -> None:
    """Ten concurrent repeats of one key (through threads, not futures) still send once."""
    configure(shared_server, sink)
    req = request(idempotency_key=key())
    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda _: send(shared_server, req), range(10)))
    assert len({r.message_id for r in responses}) == 1
    time.sleep(0.2)
    assert len(sink.received) == 1
