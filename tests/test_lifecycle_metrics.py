"""Lifecycle metrics end to end: the Prometheus series of the queue, the records by status,
background attempts, rate-limit refusals and suppressed recipients move as mail goes through."""

from __future__ import annotations

import time
from typing import Any

import grpc
from mailsvc.v1 import mail_pb2, settings_pb2, suppression_pb2, suppression_pb2_grpc

from tests.conftest import (
    SUPERADMIN,
    Server,
    auth,
    free_port,
    make_token,
    smtp_settings,
)
from tests.helpers import (
    ServerFactory,
    SmtpFactory,
    assert_error,
    expect_error,
    mail,
    scrape,
    send,
    send_fails,
    wait_until,
)

ALICE = auth(make_token([], sub="alice"))
BOB = auth(make_token([], sub="bob"))
S = mail_pb2.MessageStatus
REFRESH = 12.0  # the queue gauges are read from the store every 5 s: allow two rounds and load


def messages(status: str) -> str:
    return f'mailsvc_messages{{status="{status}"}}'


def attempts(outcome: str, transport: str = "smtp") -> str:
    return f'mailsvc_queue_attempts_total{{outcome="{outcome}",transport="{transport}"}}'


DEPTH = "mailsvc_queue_depth"
OLDEST = "mailsvc_queue_oldest_due_age_seconds"


def wait_metrics(port: int, want: dict[str, Any], what: str, timeout: float = REFRESH) -> None:
    """Poll /metrics until every series in `want` has its value (or passes its check)."""
    seen: dict[str, float] = {}

    def met() -> bool:
        nonlocal seen
        seen = scrape(port)
        for name, expected in want.items():
            value = seen.get(name)
            if callable(expected):
                if value is None or not expected(value):
                    return False
            elif value != expected:
                return False
        return True

    try:
        wait_until(met, timeout, what)
    except AssertionError as exc:
        shown = {name: seen.get(name) for name in want}
        raise AssertionError(
            f"{exc}; last seen {shown} {[k for k in seen if 'attempts_total' in k]}"
        ) from None


def metrics_server(server_factory: ServerFactory, *args: str) -> tuple[Server, int]:
    port = free_port()
    return server_factory("--metrics-listen", f"127.0.0.1:{port}", *args), port


def test_queue_gauges_records_by_status_and_attempts_move(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    # One worker and a slow sink: a second mail waits, due, while the first is attempted.
    sink = smtp_factory(delay=7.0)
    server, port = metrics_server(
        server_factory,
        *("--queue-workers", "1", "--send-attempts", "1"),
        *("--queue-retry-initial", "3600", "--queue-retry-max", "3600"),
    )
    server.put_settings(settings_pb2.MailSettings(smtp=smtp_settings(sink)))
    wait_metrics(port, {messages("QUEUED"): 0, DEPTH: 0, OLDEST: 0}, "the first refresh")

    sink.handler.data_replies = ["451 4.3.0 try later"]
    first = send(server, mail(to=["first@example.com"], queue=True))
    sink.wait_data(1)  # the only worker is busy with it for 7 s
    sink.handler.delay = 0
    sent_at = time.time()
    second = send(server, mail(to=["second@example.com"], queue=True))
    wait_metrics(
        port,
        {
            DEPTH: 2,
            messages("SENDING"): 1,
            messages("QUEUED"): 1,
            OLDEST: lambda age: 0 < age <= time.time() - sent_at + 1,
        },
        "the second mail waits, due",
    )

    # The first got 451 and waits an hour for its next attempt: pending, not due.
    sink.wait_for(1, timeout=15)
    assert [r.rcpt_tos for r in sink.received] == [["second@example.com"]]
    wait_metrics(
        port,
        {
            messages("SENT"): 1,
            messages("QUEUED"): 1,
            messages("SENDING"): 0,
            DEPTH: 1,
            OLDEST: 0,
            attempts("retry"): 1,
            attempts("sent"): 1,
            "mailsvc_queue_attempt_duration_seconds_count": 2,
        },
        "one sent, one waiting for its retry",
    )

    waiting = server.mail.GetMessage(
        mail_pb2.GetMessageRequest(id=first.id), metadata=SUPERADMIN, timeout=10
    )
    assert (waiting.status, waiting.transport) == (S.MESSAGE_STATUS_QUEUED, "smtp")

    sink.handler.data_replies = ["550 5.1.1 no such user"]
    third = send(server, mail(to=["third@example.com"], queue=True))
    wait_metrics(port, {attempts("failed"): 1, messages("FAILED"): 1}, "a permanent failure")
    cancelled = server.mail.CancelMessage(
        mail_pb2.CancelMessageRequest(id=first.id), metadata=SUPERADMIN, timeout=10
    )
    assert cancelled.status == S.MESSAGE_STATUS_CANCELLED
    wait_metrics(
        port,
        {messages("CANCELLED"): 1, messages("QUEUED"): 0, DEPTH: 0, attempts("retry"): 1},
        "the waiting one cancelled",
    )
    assert len(sink.received) == 1
    for id, status in ((second.id, S.MESSAGE_STATUS_SENT), (third.id, S.MESSAGE_STATUS_FAILED)):
        record = server.mail.GetMessage(
            mail_pb2.GetMessageRequest(id=id), metadata=SUPERADMIN, timeout=10
        )
        assert record.status == status


def test_rate_limit_refusals_are_counted_by_reason(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    sink = smtp_factory()
    server, port = metrics_server(server_factory)
    minute = 'mailsvc_rate_limited_total{reason="RATE_LIMITED"}'
    day = 'mailsvc_rate_limited_total{reason="DAILY_QUOTA_EXCEEDED"}'

    def settings(**limit: int) -> settings_pb2.MailSettings:
        return settings_pb2.MailSettings(
            smtp=smtp_settings(sink),
            enable_user_full_access=True,
            rate_limits=[settings_pb2.RateLimit(role="user", **limit)],
        )

    server.put_settings(settings(per_minute=1))
    send(server, mail(), metadata=ALICE)
    assert scrape(port).get(minute, 0) == 0
    for _ in range(2):
        err = send_fails(server, mail(), metadata=ALICE)
        assert_error(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert scrape(port)[minute] == 2

    server.put_settings(settings(per_minute=10, per_day=1))
    send(server, mail(queue=True), metadata=BOB)
    err = send_fails(server, mail(queue=True), metadata=BOB)
    assert_error(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "DAILY_QUOTA_EXCEEDED")
    after = scrape(port)
    assert (after[minute], after[day]) == (2, 1)
    assert len(sink.wait_for(2)) == 2


def test_suppressed_recipients_are_counted(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    sink = smtp_factory()
    server, port = metrics_server(server_factory)
    server.put_settings(settings_pb2.MailSettings(smtp=smtp_settings(sink)))
    suppressions = suppression_pb2_grpc.SuppressionServiceStub(server.channel)
    for address in ("gone@example.com", "left@example.com"):
        suppressions.AddSuppression(
            suppression_pb2.AddSuppressionRequest(
                suppression=suppression_pb2.Suppression(
                    address=address, reason=suppression_pb2.SUPPRESSION_REASON_MANUAL
                )
            ),
            metadata=SUPERADMIN,
            timeout=10,
        )
    counted = "mailsvc_suppressed_recipients_total"
    send(server, mail(to=["ok@example.com"]), metadata=SUPERADMIN)
    assert scrape(port)[counted] == 0

    reply = send(server, mail(to=["ok@example.com", "Gone@Example.com"]), metadata=SUPERADMIN)
    assert [a.lower() for a in reply.suppressed] == ["gone@example.com"]
    assert scrape(port)[counted] == 1
    err = expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        send,
        server,
        mail(to=["gone@example.com"], cc=["left@example.com"]),
        metadata=SUPERADMIN,
    )
    assert_error(err, grpc.StatusCode.FAILED_PRECONDITION, "ALL_RECIPIENTS_SUPPRESSED")
    assert scrape(port)[counted] == 3
    queued = send(
        server,
        mail(to=["ok@example.com"], bcc=["left@example.com"], queue=True),
        metadata=SUPERADMIN,
    )
    assert list(queued.suppressed) == ["left@example.com"]
    assert scrape(port)[counted] == 4
    assert len(sink.wait_for(3)) == 3
