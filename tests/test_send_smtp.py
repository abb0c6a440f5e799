"""SendMail over SMTP, end to end: the real server delivering to a real aiosmtpd sink."""

from __future__ import annotations

import email
import email.policy
import email.utils
import time
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import grpc
from mailsvc.v1 import mail_pb2, settings_pb2

from tests.conftest import (
    SMTP_LOGIN,
    SMTP_PASSWORD,
    Server,
    SmtpSink,
    details,
    free_port,
    smtp_settings,
)
from tests.helpers import (
    ServerFactory,
    SmtpFactory,
    addresses,
    assert_error,
    only_mail,
    send,
    send_fails,
    text_of,
)

SENDER = "sender@example.com"
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 4 + b"\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2

# --- helpers -----------------------------------------------------------------------------------


def start(
    server_factory: ServerFactory,
    sink: SmtpSink | None = None,
    *args: str,
    env: dict[str, str] | None = None,
    default_from: str = SENDER,
    **smtp: Any,
) -> Server:
    """Start a server whose settings send through `sink` (configured with `smtp` extras)."""
    server = server_factory(*args, env=env)
    settings = settings_pb2.MailSettings(default_from=default_from)
    if sink is not None:
        settings.smtp.CopyFrom(smtp_settings(sink, **smtp))
    server.put_settings(settings)
    return server


def assert_nothing_received(sink: SmtpSink) -> None:
    # No wait: the sink keeps a mail before it answers DATA, so before the failed call returned.
    assert sink.received == []


def bytes_of(part: EmailMessage) -> bytes:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


def parts_of(msg: EmailMessage, content_type: str) -> list[EmailMessage]:
    return [part for part in msg.walk() if part.get_content_type() == content_type]


def disposed(msg: EmailMessage, disposition: str) -> list[EmailMessage]:
    return [part for part in msg.walk() if part.get_content_disposition() == disposition]


# --- plain delivery ----------------------------------------------------------------------------


def test_headers_and_envelope(server_factory: ServerFactory, smtp_factory: SmtpFactory) -> None:
    sink = smtp_factory()
    server = start(server_factory, sink)
    to = ["alice@example.com", "bob@example.org"]
    cc = ["carol@example.net"]
    bcc = ["dave@example.com"]

    response = send(server, to=to, cc=cc, bcc=bcc, subject="Quarterly report", text="Hi all")

    assert response.transport == "smtp"
    assert sorted(response.recipients) == sorted(to + cc + bcc)
    [received] = sink.wait_for(1)
    msg = received.message
    assert addresses(msg, "From") == [SENDER]
    assert addresses(msg, "To") == sorted(to)
    assert addresses(msg, "Cc") == cc
    assert msg["Subject"] == "Quarterly report"
    sent_at = email.utils.parsedate_to_datetime(str(msg["Date"]))
    if sent_at.tzinfo is None:
        sent_at = sent_at.replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - sent_at) < timedelta(minutes=5)
    message_id = str(msg["Message-ID"]).strip()
    assert message_id.startswith("<") and message_id.endswith(">") and "@" in message_id
    assert response.message_id == message_id
    # Bcc: in the envelope, never in a header.
    assert "Bcc" not in msg
    assert b"dave@example.com" not in received.raw
    assert received.mail_from == SENDER
    assert sorted(received.rcpt_tos) == sorted(to + cc + bcc)


def test_each_mail_has_its_own_message_id(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    sink = smtp_factory()
    server = start(server_factory, sink)

    first = send(server, to=["alice@example.com"], subject="one", text="1")
    second = send(server, to=["alice@example.com"], subject="two", text="2")

    assert first.message_id != second.message_id
    received = sink.wait_for(2)
    assert [str(r.message["Message-ID"]).strip() for r in received] == [
        first.message_id,
        second.message_id,
    ]


def test_text_only_is_text_plain(server_factory: ServerFactory, smtp_factory: SmtpFactory) -> None:
    sink = smtp_factory()
    server = start(server_factory, sink)

    send(server, to=["alice@example.com"], subject="Plain", text="Line one\nLine two")

    msg = only_mail(sink)
    assert msg.get_content_type() == "text/plain"
    assert not msg.is_multipart()
    assert text_of(msg) == "Line one\nLine two"


def test_html_only_is_text_html(server_factory: ServerFactory, smtp_factory: SmtpFactory) -> None:
    sink = smtp_factory()
    server = start(server_factory, sink)

    send(server, to=["alice@example.com"], subject="Html", html="<p>Hello <b>you</b></p>")

    msg = only_mail(sink)
    assert msg.get_content_type() == "text/html"
    assert text_of(msg) == "<p>Hello <b>you</b></p>"


def test_text_and_html_is_multipart_alternative(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    sink = smtp_factory()
    server = start(server_factory, sink)

    send(
        server,
        to=["alice@example.com"],
        subject="Both",
        text="Hello you",
        html="<p>Hello <b>you</b></p>",
    )

    msg = only_mail(sink)
    assert msg.get_content_type() == "multipart/alternative"
    # Alternatives go from the plainest to the richest (RFC 2046).
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    plain = msg.get_body(preferencelist=("plain",))
    html = msg.get_body(preferencelist=("html",))
    assert isinstance(plain, EmailMessage) and isinstance(html, EmailMessage)
    assert text_of(plain) == "Hello you"
    assert text_of(html) == "<p>Hello <b>you</b></p>"


def test_utf8_subject_and_bodies(server_factory: ServerFactory, smtp_factory: SmtpFactory) -> None:
    sink = smtp_factory()
    server = start(server_factory, sink)
    subject = "Grüße ✓ aus Köln — naïve café"
    text = "Grüße ✓\nDéjà vu — 日本語"
    html = "<p>Grüße ✓ — 日本語</p>"

    send(server, to=["alice@example.com"], subject=subject, text=text, html=html)

    msg = only_mail(sink)
    assert msg["Subject"] == subject
    plain = msg.get_body(preferencelist=("plain",))
    rich = msg.get_body(preferencelist=("html",))
    assert isinstance(plain, EmailMessage) and isinstance(rich, EmailMessage)
    assert text_of(plain) == text
    assert text_of(rich) == html


def test_reply_to_header(server_factory: ServerFactory, smtp_factory: SmtpFactory) -> None:
    sink = smtp_factory()
    server = start(server_factory, sink)

    send(
        server,
        to=["alice@example.com"],
        subject="Answer elsewhere",
        text="Please reply to support",
        reply_to="support@example.org",
    )

    msg = only_mail(sink)
    assert addresses(msg, "Reply-To") == ["support@example.org"]


def test_no_reply_to_header_when_not_given(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    sink = smtp_factory()
    server = start(server_factory, sink)

    send(server, to=["alice@example.com"], subject="s", text="t")

    assert "Reply-To" not in only_mail(sink)


# --- attachments -------------------------------------------------------------------------------


def test_pdf_attachment(server_factory: ServerFactory, smtp_factory: SmtpFactory) -> None:
    sink = smtp_factory()
    server = start(server_factory, sink)
    pdf = mail_pb2.Attachment(filename="report.pdf", content_type="application/pdf", content=PDF)

    send(server, to=["alice@example.com"], subject="Report", text="See attached", attachments=[pdf])

    msg = only_mail(sink)
    assert msg.get_content_type() == "multipart/mixed"
    body = msg.get_body(preferencelist=("plain",))
    assert isinstance(body, EmailMessage)
    assert text_of(body) == "See attached"
    [part] = disposed(msg, "attachment")
    assert part.get_filename() == "report.pdf"
    assert part.get_content_type() == "application/pdf"
    assert bytes_of(part) == PDF


def test_content_type_guessed_from_filename(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    sink = smtp_factory()
    server = start(server_factory, sink)
    csv = b"name,qty\nwidget,3\ngadget,7\n"
    attachment = mail_pb2.Attachment(filename="report.csv", content=csv)

    send(server, to=["alice@example.com"], subject="Data", text="CSV", attachments=[attachment])

    msg = only_mail(sink)
    [part] = disposed(msg, "attachment")
    assert part.get_filename() == "report.csv"
    assert part.get_content_type() == "text/csv"
    # Text parts travel with CRLF line ends (their canonical form); the bytes are otherwise intact.
    assert bytes_of(part).replace(b"\r\n", b"\n") == csv


def test_several_attachments_keep_their_bytes_and_names(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    sink = smtp_factory()
    server = start(server_factory, sink)
    blob = bytes(range(256)) * 40
    attachments = [
        mail_pb2.Attachment(filename="report.pdf", content_type="application/pdf", content=PDF),
        mail_pb2.Attachment(
            filename="blob.bin", content_type="application/octet-stream", content=blob
        ),
    ]

    send(server, to=["alice@example.com"], subject="Two", text="Two", attachments=attachments)

    parts = disposed(only_mail(sink), "attachment")
    assert [(p.get_filename(), p.get_content_type(), bytes_of(p)) for p in parts] == [
        ("report.pdf", "application/pdf", PDF),
        ("blob.bin", "application/octet-stream", blob),
    ]


def test_inline_part_is_related_to_html(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    sink = smtp_factory()
    server = start(server_factory, sink)
    html = '<p>Our logo: <img src="cid:logo123"></p>'
    logo = mail_pb2.Attachment(
        filename="logo.png", content_type="image/png", content=PNG, content_id="logo123"
    )

    send(
        server,
        to=["alice@example.com"],
        subject="Logo",
        text="Our logo",
        html=html,
        attachments=[logo],
    )

    msg = only_mail(sink)
    [related] = parts_of(msg, "multipart/related")
    children = list(related.iter_parts())
    assert [c.get_content_type() for c in children] == ["text/html", "image/png"]
    html_part, image = children
    assert isinstance(html_part, EmailMessage) and isinstance(image, EmailMessage)
    assert text_of(html_part) == html
    assert image.get_content_disposition() == "inline"
    assert image.get_filename() == "logo.png"
    assert str(image["Content-ID"]).strip() == "<logo123>"
    assert bytes_of(image) == PNG
    assert disposed(msg, "attachment") == []
    plain = msg.get_body(preferencelist=("plain",))
    assert isinstance(plain, EmailMessage)
    assert text_of(plain) == "Our logo"


def test_inline_part_and_attachment_together(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    sink = smtp_factory()
    server = start(server_factory, sink)
    attachments = [
        mail_pb2.Attachment(filename="report.pdf", content_type="application/pdf", content=PDF),
        mail_pb2.Attachment(
            filename="logo.png", content_type="image/png", content=PNG, content_id="logo123"
        ),
    ]

    send(
        server,
        to=["alice@example.com"],
        subject="Both kinds",
        html='<p><img src="cid:logo123"> report attached</p>',
        attachments=attachments,
    )

    msg = only_mail(sink)
    assert msg.get_content_type() == "multipart/mixed"
    [related] = parts_of(msg, "multipart/related")
    related_types = [c.get_content_type() for c in related.iter_parts()]
    assert related_types == ["text/html", "image/png"]
    [pdf] = disposed(msg, "attachment")
    assert (pdf.get_filename(), pdf.get_content_type()) == ("report.pdf", "application/pdf")
    assert bytes_of(pdf) == PDF
    [image] = parts_of(msg, "image/png")
    assert image.get_content_disposition() == "inline"
    assert str(image["Content-ID"]).strip() == "<logo123>"
    assert bytes_of(image) == PNG


# --- AUTH ----------------------------------------------------------------------------------------


def test_auth_with_right_password_delivers(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    sink = smtp_factory(auth=True)
    server = start(server_factory, sink, login=SMTP_LOGIN, password=SMTP_PASSWORD)

    response = send(server, to=["alice@example.com"], subject="Authenticated", text="ok")

    assert response.transport == "smtp"
    assert only_mail(sink)["Subject"] == "Authenticated"
    server.stop()
    assert SMTP_PASSWORD not in server.logs()


def test_auth_with_wrong_password_is_failed_precondition(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    sink = smtp_factory(auth=True)
    server = start(server_factory, sink, login=SMTP_LOGIN, password="nope")

    err = send_fails(server, to=["alice@example.com"], subject="s", text="t")

    assert_error(err, grpc.StatusCode.FAILED_PRECONDITION, "SMTP_AUTH_FAILED")
    shown = f"{err.details()} {details(err)}"
    assert "nope" not in shown
    assert SMTP_PASSWORD not in shown
    assert_nothing_received(sink)


# --- TLS -------------------------------------------------------------------------------------


def test_starttls_required_delivers(
    server_factory: ServerFactory, smtp_factory: SmtpFactory, ca_file: Path
) -> None:
    sink = smtp_factory("starttls")
    server = start(
        server_factory, sink, env={"SSL_CERT_FILE": str(ca_file)}, start_tls_required=True
    )

    response = send(server, to=["alice@example.com"], subject="Over STARTTLS", text="secret")

    assert response.transport == "smtp"
    assert only_mail(sink)["Subject"] == "Over STARTTLS"


def test_starttls_required_but_not_offered(
    server_factory: ServerFactory, smtp_factory: SmtpFactory, ca_file: Path
) -> None:
    sink = smtp_factory("plain")
    server = start(
        server_factory, sink, env={"SSL_CERT_FILE": str(ca_file)}, start_tls_required=True
    )

    err = send_fails(server, to=["alice@example.com"], subject="s", text="t")

    assert_error(err, grpc.StatusCode.FAILED_PRECONDITION, "STARTTLS_NOT_OFFERED")
    assert_nothing_received(sink)


def test_starttls_with_untrusted_certificate_fails(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    sink = smtp_factory("starttls")
    server = start(server_factory, sink, start_tls_required=True)

    err = send_fails(server, to=["alice@example.com"], subject="s", text="t")

    assert err.code() != grpc.StatusCode.OK
    assert_nothing_received(sink)


def test_implicit_tls_delivers(
    server_factory: ServerFactory, smtp_factory: SmtpFactory, ca_file: Path
) -> None:
    sink = smtp_factory("implicit")
    server = start(server_factory, sink, env={"SSL_CERT_FILE": str(ca_file)}, ssl_on_connect=True)

    response = send(server, to=["alice@example.com"], subject="Over TLS", text="secret")

    assert response.transport == "smtp"
    assert only_mail(sink)["Subject"] == "Over TLS"


def test_implicit_tls_with_untrusted_certificate_fails(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    sink = smtp_factory("implicit")
    server = start(server_factory, sink, ssl_on_connect=True)

    err = send_fails(server, to=["alice@example.com"], subject="s", text="t")

    assert err.code() != grpc.StatusCode.OK
    assert_nothing_received(sink)


# --- failures --------------------------------------------------------------------------------


def test_closed_port_is_unavailable_quickly(server_factory: ServerFactory) -> None:
    server = server_factory()
    closed = settings_pb2.SmtpSettings(host="127.0.0.1", port=free_port())
    server.put_settings(settings_pb2.MailSettings(smtp=closed, default_from=SENDER))

    began = time.monotonic()
    err = send_fails(server, to=["alice@example.com"], subject="s", text="t")
    elapsed = time.monotonic() - began

    assert_error(err, grpc.StatusCode.UNAVAILABLE, "SMTP_UNAVAILABLE")
    assert elapsed < 5


def test_data_rejected_permanently(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    sink = smtp_factory()
    sink.handler.data_replies = ["550 no"]
    server = start(server_factory, sink)

    err = send_fails(server, to=["alice@example.com"], subject="s", text="t")

    assert_error(err, grpc.StatusCode.FAILED_PRECONDITION, "SMTP_REJECTED")
    assert_nothing_received(sink)


def test_data_deferred_is_unavailable(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    sink = smtp_factory()
    # Enough temporary failures to outlast any retries.
    sink.handler.data_replies = ["451 try later"] * 20
    server = start(server_factory, sink)

    err = send_fails(server, to=["alice@example.com"], subject="s", text="t")

    assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
    assert_nothing_received(sink)


# --- From ------------------------------------------------------------------------------------


def test_settings_default_from_wins_over_flag(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    sink = smtp_factory()
    server = start(server_factory, sink, "--default-from", "robot@example.org", default_from=SENDER)

    send(server, to=["alice@example.com"], subject="s", text="t")

    [received] = sink.wait_for(1)
    assert addresses(received.message, "From") == [SENDER]
    assert received.mail_from == SENDER


def test_default_from_flag_when_settings_have_none(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    sink = smtp_factory()
    server = start(server_factory, sink, "--default-from", "robot@example.org", default_from="")

    send(server, to=["alice@example.com"], subject="s", text="t")

    [received] = sink.wait_for(1)
    assert addresses(received.message, "From") == ["robot@example.org"]
    assert received.mail_from == "robot@example.org"


def test_builtin_default_from(server_factory: ServerFactory, smtp_factory: SmtpFactory) -> None:
    sink = smtp_factory()
    server = start(server_factory, sink, default_from="")

    send(server, to=["alice@example.com"], subject="s", text="t")

    [received] = sink.wait_for(1)
    assert addresses(received.message, "From") == ["no-reply@localhost"]


# --- dev mode --------------------------------------------------------------------------------


def test_dev_mode_writes_eml_to_outbox(server_factory: ServerFactory) -> None:
    server = server_factory("--dev")
    to = ["alice@example.com"]
    cc = ["carol@example.net"]

    response = send(
        server, to=to, cc=cc, subject="Grüße from dev", text="Stored, not sent", html="<p>x</p>"
    )

    assert response.transport == "maildir"
    assert sorted(response.recipients) == sorted(to + cc)
    files = sorted((server.data_dir / "outbox").rglob("*.eml"))
    assert len(files) == 1
    msg = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert addresses(msg, "From") == ["no-reply@localhost"]
    assert addresses(msg, "To") == to
    assert addresses(msg, "Cc") == cc
    assert msg["Subject"] == "Grüße from dev"
    assert str(msg["Message-ID"]).strip() == response.message_id
    plain = msg.get_body(preferencelist=("plain",))
    assert isinstance(plain, EmailMessage)
    assert text_of(plain) == "Stored, not sent"
