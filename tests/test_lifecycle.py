"""Message lifecycle end to end: records of sync and queued sends, scheduling, cancel,
visibility, paging, background retries and failures, failover, crash and restart."""

from __future__ import annotations

import signal
import time
from typing import Any

import grpc
from mailsvc.v1 import mail_pb2, settings_pb2

from tests.conftest import (
    ADMIN,
    SUPERADMIN,
    ConnectionCounter,
    CountingController,
    MailgunStandIn,
    Server,
    SinkHandler,
    SmtpSink,
    auth,
    details,
    free_port,
    make_token,
    smtp_settings,
)
from tests.helpers import (
    ServerFactory,
    assert_error,
    at,
    expect_error,
    mail,
    message_id_header,
    send,
    wait_until,
)

FAST_QUEUE = ("--queue-retry-initial", "0.2", "--queue-retry-max", "0.4")
ALICE = auth(make_token([], sub="alice"))
BOB = auth(make_token([], sub="bob"))
S = mail_pb2.MessageStatus


def get(server: Server, id: str, metadata: Any = ADMIN) -> mail_pb2.Message:
    reply: mail_pb2.Message = server.mail.GetMessage(
        mail_pb2.GetMessageRequest(id=id), metadata=metadata, timeout=10
    )
    return reply


def wait_status(server: Server, id: str, status: int, timeout: float = 15) -> mail_pb2.Message:
    wait_until(lambda: get(server, id).status == status, timeout, f"{id} {S.Name(status)}")
    return get(server, id)


def statuses(message: mail_pb2.Message) -> list[str]:
    return [S.Name(e.status).removeprefix("MESSAGE_STATUS_") for e in message.events]


def smtp_server(
    server_factory: ServerFactory, sink: SmtpSink, *args: str, **settings: Any
) -> Server:
    server = server_factory(*FAST_QUEUE, *args)
    server.put_settings(
        settings_pb2.MailSettings(
            smtp=smtp_settings(sink), enable_user_full_access=True, **settings
        )
    )
    return server


def test_queued_mail_arrives_and_its_record_turns_sent_with_the_sinks_message_id(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = smtp_server(server_factory, smtp_sink)
    reply = send(server, mail(queue=True))
    assert reply.status == S.MESSAGE_STATUS_QUEUED and reply.id
    assert (reply.message_id, reply.transport, list(reply.recipients)) == ("", "", [])
    received = smtp_sink.wait_for(1)
    assert len(received) == 1
    record = wait_status(server, reply.id, S.MESSAGE_STATUS_SENT)
    assert record.message_id == message_id_header(received[0])
    assert record.transport == "smtp" and record.attempts == 1 and record.caller == "ops"
    assert statuses(record) == ["QUEUED", "SENDING", "SENT"]
    assert record.send_time == record.create_time  # no send_at: send_time is create_time


def test_sync_send_answers_as_v1_and_is_recorded_sent(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = smtp_server(server_factory, smtp_sink)
    reply = send(server, mail(to=["a@example.com"], cc=["Cee <c@example.com>"]))
    received = smtp_sink.wait_for(1)
    assert reply.message_id == message_id_header(received[0]) and reply.transport == "smtp"
    assert reply.status == S.MESSAGE_STATUS_SENT and reply.id
    record = get(server, reply.id)
    assert record.status == S.MESSAGE_STATUS_SENT and record.message_id == reply.message_id
    assert list(record.to) == ["a@example.com"] and list(record.cc) == ["Cee <c@example.com>"]
    assert record.subject == "Hi" and record.create_time.seconds > 0


def test_scheduled_mail_waits_for_send_at(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = smtp_server(server_factory, smtp_sink)
    send_at = at(2.5)
    reply = send(server, mail(send_at=send_at))
    assert reply.status == S.MESSAGE_STATUS_SCHEDULED
    record = get(server, reply.id)
    assert record.send_time == send_at
    smtp_sink.expect_no_more(within=1.5)
    assert len(smtp_sink.wait_for(1)) == 1
    assert time.time() >= send_at.ToNanoseconds() / 1e9
    wait_status(server, reply.id, S.MESSAGE_STATUS_SENT)


def test_send_at_more_than_7_days_ahead_is_invalid(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = smtp_server(server_factory, smtp_sink)
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, send, server, mail(send_at=at(8 * 86400)))
    assert "send_at" in details(err)["violations"]
    # in the past: sent as if queued
    reply = send(server, mail(send_at=at(-60)))
    assert reply.status == S.MESSAGE_STATUS_QUEUED
    wait_status(server, reply.id, S.MESSAGE_STATUS_SENT)


def test_cancel_scheduled_and_not_cancellable(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = smtp_server(server_factory, smtp_sink)
    scheduled = send(server, mail(send_at=at(3600)))
    cancelled: mail_pb2.Message = server.mail.CancelMessage(
        mail_pb2.CancelMessageRequest(id=scheduled.id), metadata=ADMIN, timeout=10
    )
    assert cancelled.status == S.MESSAGE_STATUS_CANCELLED
    assert statuses(get(server, scheduled.id)) == ["SCHEDULED", "CANCELLED"]
    sent = send(server, mail())
    for id in (scheduled.id, sent.id):
        err = expect_error(
            grpc.StatusCode.FAILED_PRECONDITION,
            server.mail.CancelMessage,
            mail_pb2.CancelMessageRequest(id=id),
            metadata=ADMIN,
            timeout=10,
        )
        assert_error(err, grpc.StatusCode.FAILED_PRECONDITION, "MESSAGE_NOT_CANCELLABLE")
    assert len(smtp_sink.received) == 1


def test_a_message_is_visible_to_its_caller_and_admins_only(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = smtp_server(server_factory, smtp_sink)
    mine = send(server, mail(send_at=at(3600)), metadata=ALICE)
    assert get(server, mine.id, ALICE).caller == "alice"
    assert get(server, mine.id, SUPERADMIN).caller == "alice"
    for id in (mine.id, "no-such-id"):
        for call, request in (
            (server.mail.GetMessage, mail_pb2.GetMessageRequest(id=id)),
            (server.mail.CancelMessage, mail_pb2.CancelMessageRequest(id=id)),
        ):
            err = expect_error(grpc.StatusCode.NOT_FOUND, call, request, metadata=BOB, timeout=10)
            assert_error(err, grpc.StatusCode.NOT_FOUND, "MESSAGE_NOT_FOUND")

    def listed(metadata: Any, **fields: Any) -> list[str]:
        reply = server.mail.ListMessages(
            mail_pb2.ListMessagesRequest(**fields), metadata=metadata, timeout=10
        )
        return [m.id for m in reply.messages]

    theirs = send(server, mail(send_at=at(3600)), metadata=BOB)
    assert listed(BOB) == [theirs.id]
    assert listed(BOB, caller="alice") == [theirs.id]  # the filter is not theirs to set
    assert listed(ADMIN, caller="alice") == [mine.id]
    assert listed(ADMIN) == [theirs.id, mine.id]
    assert get(server, mine.id, SUPERADMIN).status == S.MESSAGE_STATUS_SCHEDULED


def test_listing_pages_through_hundreds_without_gaps_or_repeats(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = smtp_server(server_factory, smtp_sink)
    server.put_settings(
        settings_pb2.MailSettings(
            smtp=smtp_settings(smtp_sink),
            templates={"t": settings_pb2.MailTemplate(subject="s", text="x")},
        )
    )
    ids: list[str] = []
    for _ in range(3):  # three creation times, each shared by 100 records
        reply = server.mail.SendMailBatch(
            mail_pb2.SendMailBatchRequest(
                template_name="t",
                send_at=at(3600),
                entries=[mail_pb2.BatchEntry(to=[f"r{i}@example.com"]) for i in range(100)],
            ),
            metadata=SUPERADMIN,
            timeout=30,
        )
        ids.extend(r.id for r in reply.results)
    seen: list[str] = []
    request = mail_pb2.ListMessagesRequest(page_size=37)
    while True:
        page = server.mail.ListMessages(request, metadata=ADMIN, timeout=10)
        assert len(page.messages) <= 37
        seen.extend(m.id for m in page.messages)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert len(seen) == len(set(seen)) == 300 and set(seen) == set(ids)
    batches = [set(ids[i : i + 100]) for i in (200, 100, 0)]  # newest first
    assert [set(seen[i : i + 100]) for i in (0, 100, 200)] == batches

    first = server.mail.ListMessages(
        mail_pb2.ListMessagesRequest(page_size=5), metadata=ADMIN, timeout=10
    )
    for bad in (
        mail_pb2.ListMessagesRequest(page_token="not-a-token"),
        mail_pb2.ListMessagesRequest(page_token=first.next_page_token[:-2] + "AA"),
        mail_pb2.ListMessagesRequest(
            page_token=first.next_page_token, status=S.MESSAGE_STATUS_SCHEDULED
        ),
        mail_pb2.ListMessagesRequest(page_token=first.next_page_token, recipient="r1@example.com"),
    ):
        err = expect_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            server.mail.ListMessages,
            bad,
            metadata=ADMIN,
            timeout=10,
        )
        assert "page_token" in details(err)["violations"]
    by_recipient = server.mail.ListMessages(
        mail_pb2.ListMessagesRequest(recipient="R7@Example.com"), metadata=ADMIN, timeout=10
    )
    assert len(by_recipient.messages) == 3


def test_451_then_250_is_retried_in_the_background(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = smtp_server(server_factory, smtp_sink, "--send-attempts", "1")
    smtp_sink.handler.data_replies = ["451 try later"]
    reply = send(server, mail(queue=True))
    record = wait_status(server, reply.id, S.MESSAGE_STATUS_SENT)
    assert record.attempts == 2 and len(smtp_sink.received) == 1
    assert statuses(record) == ["QUEUED", "SENDING", "QUEUED", "SENDING", "SENT"]
    assert "next attempt" in record.events[2].detail


def test_550_fails_at_once(server_factory: ServerFactory, smtp_sink: SmtpSink) -> None:
    server = smtp_server(server_factory, smtp_sink)
    smtp_sink.handler.always = "550 no such user"
    reply = send(server, mail(queue=True))
    record = wait_status(server, reply.id, S.MESSAGE_STATUS_FAILED)
    assert record.attempts == 1 and record.last_error_reason == "SMTP_REJECTED"
    assert record.last_error and "550" in record.last_error


def test_down_past_max_age_fails(server_factory: ServerFactory) -> None:
    server = server_factory(*FAST_QUEUE, "--queue-max-age", "1.5", "--send-attempts", "1")
    server.put_settings(
        settings_pb2.MailSettings(
            smtp=settings_pb2.SmtpSettings(host="127.0.0.1", port=free_port())
        )
    )
    reply = send(server, mail(queue=True))
    record = wait_status(server, reply.id, S.MESSAGE_STATUS_FAILED)
    assert record.attempts >= 2 and "not sent within" in record.events[-1].detail


def test_down_then_up_delivers(server_factory: ServerFactory) -> None:
    port = free_port()
    server = server_factory(*FAST_QUEUE, "--send-attempts", "1")
    server.put_settings(
        settings_pb2.MailSettings(smtp=settings_pb2.SmtpSettings(host="127.0.0.1", port=port))
    )
    reply = send(server, mail(queue=True))
    wait_until(lambda: get(server, reply.id).attempts >= 2, 10, "two failed attempts")
    assert get(server, reply.id).status != S.MESSAGE_STATUS_FAILED
    handler = SinkHandler()
    controller = CountingController(handler, ConnectionCounter(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        record = wait_status(server, reply.id, S.MESSAGE_STATUS_SENT)
        assert len(handler.received) == 1 and record.attempts >= 3
    finally:
        controller.stop()


def test_queued_mail_fails_over_from_smtp_to_mailgun(
    server_factory: ServerFactory, mailgun: MailgunStandIn
) -> None:
    server = server_factory(*FAST_QUEUE, "--mailgun-base-url", mailgun.base_url)
    server.put_settings(
        settings_pb2.MailSettings(
            smtp=settings_pb2.SmtpSettings(host="127.0.0.1", port=free_port()),
            mailgun=settings_pb2.MailgunSettings(domain="example.com", key=mailgun.key),
        )
    )
    reply = send(server, mail(queue=True))
    record = wait_status(server, reply.id, S.MESSAGE_STATUS_SENT)
    assert record.transport == "mailgun" and record.message_id == "<mg-1@mailgun.test>"
    assert len(mailgun.requests) == 1
    assert mailgun.requests[0].values("h:Message-Id")[0].endswith("@localhost>")


def test_kill_9_loses_no_queued_mail_and_sends_each_once(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = smtp_server(server_factory, smtp_sink)
    send_at = at(3)
    ids = [send(server, mail(to=[f"r{i}@example.com"], send_at=send_at)).id for i in range(50)]
    server.proc.kill()
    server.proc.wait(10)
    assert smtp_sink.received == []
    again = server_factory(*FAST_QUEUE, data_dir=server.data_dir)
    received = smtp_sink.wait_for(50, timeout=30)
    smtp_sink.expect_no_more(within=1.0)
    assert len(received) == 50
    assert sorted(r.rcpt_tos[0] for r in received) == sorted(f"r{i}@example.com" for i in range(50))
    for id in ids:
        wait_status(again, id, S.MESSAGE_STATUS_SENT)


def test_sigterm_keeps_the_queue_for_the_next_start(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = smtp_server(server_factory, smtp_sink)
    ids = [send(server, mail(send_at=at(2))).id for _ in range(5)]
    assert server.stop(signal.SIGTERM) == 0
    assert smtp_sink.received == []
    again = server_factory(*FAST_QUEUE, data_dir=server.data_dir)
    assert len(smtp_sink.wait_for(5, timeout=20)) == 5
    for id in ids:
        wait_status(again, id, S.MESSAGE_STATUS_SENT)


def test_idempotent_queued_send_returns_the_same_id_also_after_a_restart(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = smtp_server(server_factory, smtp_sink)
    request = mail(queue=True, idempotency_key="k-1")
    first = send(server, request)
    assert send(server, request) == first
    wait_status(server, first.id, S.MESSAGE_STATUS_SENT)
    server.stop(signal.SIGKILL)
    again = server_factory(*FAST_QUEUE, data_dir=server.data_dir)
    assert send(again, request) == first
    other = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        send,
        again,
        mail(queue=True, idempotency_key="k-1", subject="x"),
    )
    assert "idempotency_key" in details(other)["violations"]
    smtp_sink.expect_no_more(within=0.5)
    assert len(smtp_sink.received) == 1


def test_idempotent_sync_send_returns_the_same_id(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = smtp_server(server_factory, smtp_sink)
    request = mail(idempotency_key="sync-1")
    first = send(server, request)
    assert send(server, request) == first and first.status == S.MESSAGE_STATUS_SENT
    assert get(server, first.id).message_id == first.message_id
    assert len(smtp_sink.wait_for(1)) == 1
