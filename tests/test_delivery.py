"""Delivery guarantees, end to end: idempotency, retries, failover, the SMTP pool, drain, crashes.

The real server runs as a subprocess; the SMTP servers (aiosmtpd) and the Mailgun stand-in run
in this process on 127.0.0.1 and misbehave on purpose: they refuse, answer 4xx/5xx, go slow,
and count what they see (connections, DATA commands, HTTP requests).
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from mailsvc.v1 import mail_pb2, mail_pb2_grpc, settings_pb2

from tests.conftest import (
    ADMIN,
    MAILGUN_KEY,
    SUPERADMIN,
    MailgunStandIn,
    Server,
    SmtpSink,
    auth,
    details,
    free_port,
    make_token,
    serving,
    smtp_settings,
    start_server,
    wait_until,
)
from tests.helpers import (
    ServerFactory,
    SmtpFactory,
    body,
    message_id_header,
    send,
    send_fails,
    send_templated,
    struct,
)

SENDER = "sender@example.com"
RCPT = "rcpt@example.com"
DOMAIN = "mg.example.com"
TRY_LATER = "451 4.7.1 try later"
REFUSED = "550 5.7.1 refused"
# Another admin and another superadmin: same roles, different `sub`.
OTHER_ADMIN = auth(make_token(["admin"], sub="ops-2"))
OTHER_ROOT = auth(make_token(["superadmin"], sub="root-2"))


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
    sink: SmtpSink | None = None,
    *,
    smtp: settings_pb2.SmtpSettings | None = None,
    mailgun: bool = False,
    templates: dict[str, settings_pb2.MailTemplate] | None = None,
) -> None:
    settings = settings_pb2.MailSettings(default_from=SENDER, templates=templates or {})
    if sink is not None:
        settings.smtp.CopyFrom(smtp_settings(sink))
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


def assert_sent_once(sink: SmtpSink, message_id: str) -> None:
    """One DATA command reached the sink, and it delivered the mail `message_id` names."""
    assert len(sink.received) == 1
    assert sink.handler.data_commands == 1
    assert message_id_header(sink.received[0]) == message_id


# --- 1. idempotency ----------------------------------------------------------------------------

# No test here waits for "nothing more" after a call returned: the sinks count a DATA command
# when it comes and keep a mail before they answer it (the stand-in keeps a request before it
# answers), and a send ends within its call. Only work that outlives its caller (a deadline
# that passed) needs `expect_no_more`.


def test_same_key_twice_sends_once(shared_server: Server, smtp_sink: SmtpSink) -> None:
    configure(shared_server, smtp_sink)
    req = request(idempotency_key=key())
    first = send(shared_server, req)
    second = send(shared_server, req)
    assert second == first
    assert first.transport == "smtp"
    assert_sent_once(smtp_sink, first.message_id)


def test_same_key_across_a_restart_sends_once(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = server_factory()
    configure(server, smtp_sink)
    req = request(idempotency_key=key())
    first = send(server, req)
    assert server.stop(signal.SIGTERM, timeout=15) == 0
    restarted = server_factory(data_dir=server.data_dir)
    second = send(restarted, req)
    assert second == first
    assert len(smtp_sink.received) == 1
    assert smtp_sink.handler.data_commands == 1


def test_same_key_twice_at_once_sends_once(
    shared_server: Server, smtp_factory: SmtpFactory
) -> None:
    slow = smtp_factory(delay=1.0)
    configure(shared_server, slow)
    req = request(idempotency_key=key())
    calls = [shared_server.mail.SendMail.future(req, metadata=ADMIN, timeout=10) for _ in range(2)]
    responses = [call.result() for call in calls]
    assert responses[0].message_id
    assert responses[0] == responses[1]
    assert_sent_once(slow, responses[0].message_id)


def test_caller_gone_mid_send_still_records_the_key(
    shared_server: Server, smtp_factory: SmtpFactory
) -> None:
    """A caller that hangs up during DATA retries: the mail went out once, and the retry
    gets its response instead of a second mail."""
    slow = smtp_factory(delay=1.0)
    configure(shared_server, slow)
    req = request(idempotency_key=key())
    first = shared_server.mail.SendMail.future(req, metadata=ADMIN, timeout=10)
    slow.wait_data(1)
    first.cancel()
    retry = send(shared_server, req)
    assert_sent_once(slow, retry.message_id)


def test_same_key_of_another_caller_is_its_own_send(
    shared_server: Server, smtp_sink: SmtpSink
) -> None:
    configure(shared_server, smtp_sink)
    req = request(idempotency_key=key())
    mine = send(shared_server, req, metadata=ADMIN)
    theirs = send(shared_server, req, metadata=OTHER_ADMIN)
    assert mine.message_id != theirs.message_id
    assert len(smtp_sink.wait_for(2)) == 2
    # Each caller's repeat still gets its own first response.
    assert send(shared_server, req, metadata=ADMIN) == mine
    assert send(shared_server, req, metadata=OTHER_ADMIN) == theirs
    assert len(smtp_sink.received) == 2


def test_same_key_with_another_body_is_invalid(shared_server: Server, smtp_sink: SmtpSink) -> None:
    configure(shared_server, smtp_sink)
    k = key()
    send(shared_server, request("first body", idempotency_key=k))
    err = send_fails(shared_server, request("another body", idempotency_key=k))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "idempotency_key" in details(err)["violations"], details(err)
    assert len(smtp_sink.received) == 1
    assert smtp_sink.handler.data_commands == 1


HELLO = settings_pb2.MailTemplate(
    to=[RCPT], subject="Hi {{ name }}", text="Hello {{ name }}", model={"name": "string"}
)


def templated(name: str, idempotency_key: str) -> mail_pb2.SendTemplatedMailRequest:
    return mail_pb2.SendTemplatedMailRequest(
        template_name="hello", parameters=struct({"name": name}), idempotency_key=idempotency_key
    )


def test_templated_mail_is_idempotent_too(shared_server: Server, smtp_sink: SmtpSink) -> None:
    configure(shared_server, smtp_sink, templates={"hello": HELLO})
    k = key()
    first = send_templated(shared_server, "hello", {"name": "Alice"}, idempotency_key=k)
    assert send_templated(shared_server, "hello", {"name": "Alice"}, idempotency_key=k) == first
    assert len(smtp_sink.received) == 1
    assert message_id_header(smtp_sink.received[0]) == first.message_id

    # Same key, other parameters: refused, nothing sent.
    with pytest.raises(grpc.RpcError) as caught:
        send_templated(shared_server, "hello", {"name": "Bob"}, idempotency_key=k)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "idempotency_key" in details(caught.value)["violations"]

    # Same key, but SendMail instead of SendTemplatedMail: another request, refused too.
    err = send_fails(shared_server, request(idempotency_key=k), metadata=SUPERADMIN)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "idempotency_key" in details(err)["violations"]

    # Another caller with the same key: its own send.
    theirs = send_templated(
        shared_server, "hello", {"name": "Alice"}, idempotency_key=k, metadata=OTHER_ROOT
    )
    assert theirs.message_id != first.message_id
    assert len(smtp_sink.received) == 2
    assert smtp_sink.handler.data_commands == 2


def test_templated_same_key_twice_at_once_sends_once(
    shared_server: Server, smtp_factory: SmtpFactory
) -> None:
    slow = smtp_factory(delay=1.0)
    configure(shared_server, slow, templates={"hello": HELLO})
    req = templated("Alice", key())
    calls = [
        shared_server.mail.SendTemplatedMail.future(req, metadata=SUPERADMIN, timeout=10)
        for _ in range(2)
    ]
    responses = [call.result() for call in calls]
    assert responses[0].message_id
    assert responses[0] == responses[1]
    assert len(slow.received) == 1
    assert slow.handler.data_commands == 1


# --- 2. retries --------------------------------------------------------------------------------


def test_smtp_451_then_250_is_retried_once(shared_server: Server, smtp_sink: SmtpSink) -> None:
    configure(shared_server, smtp_sink)
    smtp_sink.handler.data_replies = [TRY_LATER]
    response = send(shared_server, request())
    assert response.transport == "smtp"
    assert len(smtp_sink.received) == 1
    assert smtp_sink.handler.data_commands == 2
    assert message_id_header(smtp_sink.received[0]) == response.message_id


def test_smtp_550_is_not_retried(shared_server: Server, smtp_sink: SmtpSink) -> None:
    configure(shared_server, smtp_sink)
    smtp_sink.handler.always = REFUSED
    err = send_fails(shared_server, request())
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert smtp_sink.handler.data_commands == 1
    assert smtp_sink.received == []


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
    assert len(mailgun.requests) == 1


def test_mailgun_lost_reply_is_not_retried(shared_server: Server, mailgun: MailgunStandIn) -> None:
    """A connection lost after the request went out may hide a queued mail: never resend."""
    configure(shared_server, mailgun=True)
    mailgun.hang_up = True
    err = send_fails(shared_server, request())
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
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
    shared_server: Server, smtp_sink: SmtpSink, mailgun: MailgunStandIn
) -> None:
    configure(shared_server, smtp_sink, mailgun=True)
    smtp_sink.handler.always = TRY_LATER
    response = send(shared_server, request())
    assert response.transport == "mailgun"
    assert len(mailgun.requests) == 1
    assert smtp_sink.handler.data_commands == 3  # --send-attempts default
    assert smtp_sink.received == []


def test_smtp_550_is_not_handed_to_mailgun(
    shared_server: Server, smtp_sink: SmtpSink, mailgun: MailgunStandIn
) -> None:
    configure(shared_server, smtp_sink, mailgun=True)
    smtp_sink.handler.always = REFUSED
    err = send_fails(shared_server, request())
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert mailgun.requests == []
    assert smtp_sink.handler.data_commands == 1


# --- 4. the SMTP connection pool ---------------------------------------------------------------


def test_200_concurrent_mails_over_a_pool_of_4(shared_server: Server, smtp_sink: SmtpSink) -> None:
    configure(shared_server, smtp_sink)
    calls = [
        shared_server.mail.SendMail.future(request(f"mail {i}"), metadata=ADMIN, timeout=30)
        for i in range(200)
    ]
    responses = [call.result() for call in calls]
    assert len(smtp_sink.wait_for(200)) == 200
    ids = [message_id_header(r) for r in smtp_sink.received]
    assert len(set(ids)) == 200
    assert {r.message_id for r in responses} == set(ids)
    assert sorted(body(r.message) for r in smtp_sink.received) == sorted(
        f"mail {i}" for i in range(200)
    )
    assert smtp_sink.counter.opened <= 4, smtp_sink.counter.opened
    assert smtp_sink.counter.max_open <= 4


def test_pool_size_0_opens_a_connection_per_mail(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = server_factory("--smtp-pool-size", "0")
    configure(server, smtp_sink)
    for i in range(10):
        send(server, request(f"mail {i}"))
    assert len(smtp_sink.wait_for(10)) == 10
    assert smtp_sink.counter.opened == 10


# --- 5. SIGTERM drains -------------------------------------------------------------------------


def test_sigterm_drains_calls_in_flight(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    slow = smtp_factory(delay=1.0)
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

    # Calls are refused from before health leaves SERVING: no pause needed after it.
    wait_until(lambda: not serving(server), 5, "health leaving SERVING after SIGTERM")
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
    wait_until(lambda: any(call.done() for call in calls), 10, "a first settings write")
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


def test_deadline_shorter_than_the_retries(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = server_factory("--send-attempts", "50")
    configure(server, smtp_sink)
    smtp_sink.handler.always = TRY_LATER
    start = time.monotonic()
    err = send_fails(server, request(), timeout=1.5)
    elapsed = time.monotonic() - start
    assert err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE), (
        err.code(),
        err.details(),
    )
    assert elapsed < 2.5
    assert smtp_sink.handler.data_commands >= 2  # it did retry within the deadline
    # The server is still serving, and sends once the sink recovers.
    smtp_sink.handler.always = None
    assert serving(server)
    assert send(server, request("after")).transport == "smtp"
    assert len(smtp_sink.received) == 1
    # The first mail's caller is gone, but its send must not go on and arrive late.
    smtp_sink.expect_no_more(within=0.5)


def test_many_callers_keep_one_idempotent_send(shared_server: Server, smtp_sink: SmtpSink) -> None:
    """Ten concurrent repeats of one key (through threads, not futures) still send once."""
    configure(shared_server, smtp_sink)
    req = request(idempotency_key=key())
    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda _: send(shared_server, req), range(10)))
    assert len({r.message_id for r in responses}) == 1
    assert len(smtp_sink.received) == 1
