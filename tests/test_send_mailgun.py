"""SendMail through Mailgun, end to end: the real server posting to a Mailgun stand-in."""

from __future__ import annotations

import base64
import email.utils
import time

import grpc
import pytest
from mailsvc.v1 import mail_pb2, settings_pb2

from tests.conftest import (
    MAILGUN_KEY,
    MailgunRequest,
    MailgunStandIn,
    Server,
    SmtpSink,
    details,
    free_port,
    smtp_settings,
)
from tests.helpers import ServerFactory, SmtpFactory, assert_error, send, send_fails

DOMAIN = "mg.example.com"
SENDER = "sender@example.com"
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 4 + b"\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"api:{key}".encode()).decode()


def start(
    server_factory: ServerFactory,
    base_url: str,
    *,
    key: str = MAILGUN_KEY,
    sink: SmtpSink | None = None,
) -> Server:
    """A server sending through Mailgun at `base_url` (and SMTP through `sink`, if given)."""
    server = server_factory("--mailgun-base-url", base_url)
    settings = settings_pb2.MailSettings(
        default_from=SENDER,
        mailgun=settings_pb2.MailgunSettings(domain=DOMAIN, key=key),
    )
    if sink is not None:
        settings.smtp.CopyFrom(smtp_settings(sink))
    server.put_settings(settings)
    return server


def addresses(request: MailgunRequest, name: str) -> list[str]:
    """Addresses of a form field, whether given once per address or comma-joined."""
    return sorted(addr for _, addr in email.utils.getaddresses(request.values(name)))


def only_request(mailgun: MailgunStandIn) -> MailgunRequest:
    assert len(mailgun.requests) == 1, mailgun.requests
    return mailgun.requests[0]


def test_full_mail_is_posted_to_mailgun(
    server_factory: ServerFactory, mailgun: MailgunStandIn
) -> None:
    server = start(server_factory, mailgun.base_url)
    to = ["alice@example.com", "bob@example.org"]
    cc = ["carol@example.net"]
    bcc = ["dave@example.com"]
    attachments = [
        mail_pb2.Attachment(filename="report.pdf", content_type="application/pdf", content=PDF),
        # Mailgun names inline parts by file name: keep the cid and the name the same.
        mail_pb2.Attachment(
            filename="logo.png", content_type="image/png", content=PNG, content_id="logo.png"
        ),
    ]

    response = send(
        server,
        to=to,
        cc=cc,
        bcc=bcc,
        subject="Grüße ✓ report",
        text="See the report ✓",
        html='<p>See the report <img src="cid:logo.png"></p>',
        reply_to="support@example.org",
        attachments=attachments,
    )

    request = only_request(mailgun)
    assert request.path == f"/v3/{DOMAIN}/messages"
    assert request.authorization == basic(MAILGUN_KEY)
    assert addresses(request, "from") == [SENDER]
    assert addresses(request, "to") == sorted(to)
    assert addresses(request, "cc") == cc
    assert addresses(request, "bcc") == bcc
    assert request.values("subject") == ["Grüße ✓ report"]
    assert request.values("text") == ["See the report ✓"]
    assert request.values("html") == ['<p>See the report <img src="cid:logo.png"></p>']
    assert addresses(request, "h:Reply-To") == ["support@example.org"]
    files = {(name, filename): (ctype, data) for name, filename, ctype, data in request.files}
    assert files == {
        ("attachment", "report.pdf"): ("application/pdf", PDF),
        ("inline", "logo.png"): ("image/png", PNG),
    }
    assert response.message_id == "<mg-1@mailgun.test>"
    assert response.transport == "mailgun"
    assert sorted(response.recipients) == sorted(to + cc + bcc)


def test_minimal_mail_without_attachments(
    server_factory: ServerFactory, mailgun: MailgunStandIn
) -> None:
    server = start(server_factory, mailgun.base_url)

    response = send(server, to=["alice@example.com"], subject="Hello", text="Just text")

    request = only_request(mailgun)
    assert request.path == f"/v3/{DOMAIN}/messages"
    assert addresses(request, "to") == ["alice@example.com"]
    assert addresses(request, "bcc") == []
    assert request.values("subject") == ["Hello"]
    assert request.values("text") == ["Just text"]
    assert request.files == []
    assert response.message_id == "<mg-1@mailgun.test>"
    assert response.transport == "mailgun"
    assert list(response.recipients) == ["alice@example.com"]


def test_wrong_key_is_failed_precondition(
    server_factory: ServerFactory, mailgun: MailgunStandIn
) -> None:
    wrong = "key-wrong-0123456789"
    server = start(server_factory, mailgun.base_url, key=wrong)

    err = send_fails(server, to=["alice@example.com"], subject="s", text="t")

    assert_error(err, grpc.StatusCode.FAILED_PRECONDITION, "MAILGUN_AUTH_FAILED")
    assert mailgun.requests, "the stand-in was never asked"
    assert mailgun.requests[0].authorization == basic(wrong)
    shown = f"{err.details()} {details(err)}"
    for secret in (wrong, MAILGUN_KEY, basic(wrong).removeprefix("Basic ")):
        assert secret not in shown
    server.stop()
    assert wrong not in server.logs()


@pytest.mark.parametrize(
    ("status", "code", "reason"),
    [
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED, "MAILGUN_RATE_LIMITED"),
        (503, grpc.StatusCode.UNAVAILABLE, "MAILGUN_UNAVAILABLE"),
        (500, grpc.StatusCode.UNAVAILABLE, "MAILGUN_UNAVAILABLE"),
    ],
)
def test_provider_errors(
    server_factory: ServerFactory,
    mailgun: MailgunStandIn,
    status: int,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    mailgun.always = status
    server = start(server_factory, mailgun.base_url)

    err = send_fails(server, to=["alice@example.com"], subject="s", text="t")

    assert_error(err, code, reason)
    assert mailgun.requests, "the stand-in was never asked"
    assert MAILGUN_KEY not in f"{err.details()} {details(err)}"


def test_unreachable_mailgun_is_unavailable(server_factory: ServerFactory) -> None:
    server = start(server_factory, f"http://127.0.0.1:{free_port()}")

    began = time.monotonic()
    err = send_fails(server, to=["alice@example.com"], subject="s", text="t")
    elapsed = time.monotonic() - began

    assert_error(err, grpc.StatusCode.UNAVAILABLE, "MAILGUN_UNAVAILABLE")
    assert elapsed < 5


def test_smtp_wins_when_both_are_configured(
    server_factory: ServerFactory, smtp_factory: SmtpFactory, mailgun: MailgunStandIn
) -> None:
    sink = smtp_factory()
    server = start(server_factory, mailgun.base_url, sink=sink)

    response = send(server, to=["alice@example.com"], subject="Via SMTP", text="t")

    assert response.transport == "smtp"
    received = sink.wait_for(1)
    assert len(received) == 1
    assert received[0].message["Subject"] == "Via SMTP"
    assert mailgun.requests == []


def test_key_never_logged(server_factory: ServerFactory, mailgun: MailgunStandIn) -> None:
    server = start(server_factory, mailgun.base_url)
    send(server, to=["alice@example.com"], subject="s", text="t")
    mailgun.always = 503
    send_fails(server, to=["alice@example.com"], subject="s", text="t")

    server.stop()  # the log is complete once the process is gone
    log = server.logs()
    assert MAILGUN_KEY not in log
    assert basic(MAILGUN_KEY).removeprefix("Basic ") not in log
