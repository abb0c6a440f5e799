"""The suppression list on the send side, and SuppressionService (gRPC and the CLI)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc
from mailsvc.v1 import mail_pb2, settings_pb2, suppression_pb2, suppression_pb2_grpc

from tests.conftest import ADMIN, SUPERADMIN, USER, Server, SmtpSink, details, smtp_settings
from tests.helpers import addresses, assert_error, clean_env, cli, expect_error, send

ServerFactory = Callable[..., Server]
S = mail_pb2.MessageStatus
R = suppression_pb2.SuppressionReason


def stub(server: Server) -> Any:
    return suppression_pb2_grpc.SuppressionServiceStub(server.channel)


def suppress(server: Server, address: str, reason: Any = R.SUPPRESSION_REASON_MANUAL) -> Any:
    entry = suppression_pb2.Suppression(address=address, reason=reason, detail="test")
    return stub(server).AddSuppression(
        suppression_pb2.AddSuppressionRequest(suppression=entry), metadata=ADMIN, timeout=10
    )


def smtp_server(server_factory: ServerFactory, sink: SmtpSink) -> Server:
    server = server_factory("--queue-retry-initial", "0.2")
    server.put_settings(settings_pb2.MailSettings(smtp=smtp_settings(sink)))
    return server


def test_suppressed_recipients_are_left_out_of_envelope_and_headers(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = smtp_server(server_factory, smtp_sink)
    for address in ("Gone@Example.com", "cc-gone@example.com", "BCC-gone@example.com"):
        suppress(server, address)
    reply = send(
        server,
        to=["keep@example.com", "Gone <GONE@example.COM>"],
        cc=["cc-gone@example.com", "cc@example.com"],
        bcc=["bcc-gone@example.com", "bcc@example.com"],
        subject="s",
        text="t",
    )
    assert list(reply.suppressed) == [
        "gone@example.com",
        "cc-gone@example.com",
        "bcc-gone@example.com",
    ]
    received = smtp_sink.wait_for(1)[0]
    assert sorted(received.rcpt_tos) == ["bcc@example.com", "cc@example.com", "keep@example.com"]
    assert addresses(received.message, "To") == ["keep@example.com"]
    assert addresses(received.message, "Cc") == ["cc@example.com"]
    record = server.mail.GetMessage(
        mail_pb2.GetMessageRequest(id=reply.id), metadata=ADMIN, timeout=10
    )
    assert list(record.suppressed) == list(reply.suppressed)
    assert list(record.to) == ["keep@example.com"]


def test_all_recipients_suppressed(server_factory: ServerFactory, smtp_sink: SmtpSink) -> None:
    server = smtp_server(server_factory, smtp_sink)
    suppress(server, "only@example.com", R.SUPPRESSION_REASON_BOUNCE)
    request = mail_pb2.SendMailRequest(to=["ONLY@example.com"], subject="s", text="t")
    err = expect_error(grpc.StatusCode.FAILED_PRECONDITION, send, server, request)
    assert_error(err, grpc.StatusCode.FAILED_PRECONDITION, "ALL_RECIPIENTS_SUPPRESSED")
    request.queue = True
    reply = send(server, request)
    assert reply.status == S.MESSAGE_STATUS_FAILED and list(reply.suppressed) == [
        "only@example.com"
    ]
    record = server.mail.GetMessage(
        mail_pb2.GetMessageRequest(id=reply.id), metadata=ADMIN, timeout=10
    )
    assert record.status == S.MESSAGE_STATUS_FAILED
    assert record.last_error_reason == "ALL_RECIPIENTS_SUPPRESSED"
    smtp_sink.expect_no_more(within=0.5)
    assert smtp_sink.received == []


def test_deleting_a_suppression_lets_mail_through_again(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = smtp_server(server_factory, smtp_sink)
    suppress(server, "back@example.com")
    stub(server).DeleteSuppression(
        suppression_pb2.DeleteSuppressionRequest(address="BACK@example.com"),
        metadata=ADMIN,
        timeout=10,
    )
    err = expect_error(
        grpc.StatusCode.NOT_FOUND,
        stub(server).DeleteSuppression,
        suppression_pb2.DeleteSuppressionRequest(address="back@example.com"),
        metadata=ADMIN,
        timeout=10,
    )
    assert details(err)["reason"] == "SUPPRESSION_NOT_FOUND"
    reply = send(server, to=["back@example.com"], subject="s", text="t")
    assert list(reply.suppressed) == [] and len(smtp_sink.wait_for(1)) == 1


def test_suppression_service_pages_validates_and_is_for_admins(server: Server) -> None:
    for i in range(7):
        suppress(server, f"a{i}@example.com")
    seen: list[str] = []
    request = suppression_pb2.ListSuppressionsRequest(page_size=3)
    while True:
        page = stub(server).ListSuppressions(request, metadata=SUPERADMIN, timeout=10)
        seen.extend(s.address for s in page.suppressions)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert seen == [f"a{i}@example.com" for i in range(7)]
    assert page.suppressions[0].create_time.seconds > 0
    err = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub(server).ListSuppressions,
        suppression_pb2.ListSuppressionsRequest(page_token="garbage"),
        metadata=ADMIN,
        timeout=10,
    )
    assert "page_token" in details(err)["violations"]
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, suppress, server, "not an address")
    assert "suppression.address" in details(err)["violations"]
    expect_error(
        grpc.StatusCode.PERMISSION_DENIED,
        stub(server).ListSuppressions,
        suppression_pb2.ListSuppressionsRequest(),
        metadata=USER,
        timeout=10,
    )


def test_suppressions_cli(server: Server) -> None:
    env = clean_env(
        MAILSVC_SERVER=server.address, MAILSVC_TOKEN=ADMIN[0][1].removeprefix("Bearer ")
    )
    added = cli("suppressions", "add", "Cli@Example.com", "--detail", "asked", env=env)
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["address"] == "cli@example.com"
    listed = cli("suppressions", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)["suppressions"]
    assert [(e["address"], e["reason"]) for e in entries] == [
        ("cli@example.com", "SUPPRESSION_REASON_MANUAL")
    ]
    deleted = cli("suppressions", "delete", "cli@example.com", env=env)
    assert deleted.returncode == 0, deleted.stderr
    again = cli("suppressions", "delete", "cli@example.com", env=env)
    assert again.returncode != 0 and "NOT_FOUND" in again.stderr
