"""Delivery hardening, end to end: header injection, long headers, the Mailgun domain, SMTP
credentials only over TLS, TLS verification failures, and sends whose outcome is unknown.

The real server runs as a subprocess; aiosmtpd sinks and HTTP(S) Mailgun stand-ins run in
this process on 127.0.0.1.
"""

from __future__ import annotations

import email
import email.policy
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from mailsvc.v1 import mail_pb2, settings_pb2

from tests.conftest import (
    ADMIN,
    MAILGUN_KEY,
    SMTP_LOGIN,
    SMTP_PASSWORD,
    MailgunStandIn,
    Server,
    SmtpSink,
    details,
    smtp_settings,
)
from tests.helpers import ServerFactory, SmtpFactory

SENDER = "sender@example.com"
DOMAIN = "mg.example.com"


def send(server: Server, **fields: Any) -> mail_pb2.SendMailResponse:
    request = mail_pb2.SendMailRequest(**fields)
    response: mail_pb2.SendMailResponse = server.mail.SendMail(request, metadata=ADMIN, timeout=10)
    return response


def send_fails(server: Server, **fields: Any) -> grpc.RpcError:
    request = mail_pb2.SendMailRequest(**fields)
    with pytest.raises(grpc.RpcError) as caught:
        server.mail.SendMail(request, metadata=ADMIN, timeout=10)
    return caught.value


def assert_error(err: grpc.RpcError, code: grpc.StatusCode, reason: str) -> dict[str, Any]:
    info = details(err)
    assert err.code() == code, err.details()
    assert info["reason"] == reason, info
    return info


def smtp_server(server_factory: ServerFactory, sink: SmtpSink, **smtp: Any) -> Server:
    server = server_factory()
    settings = settings_pb2.MailSettings(default_from=SENDER, smtp=smtp_settings(sink, **smtp))
    server.put_settings(settings)
    return server


def nothing_arrives(sink: SmtpSink) -> None:
    time.sleep(0.2)
    assert sink.received == []


# --- control characters in header values (issue 10 #11) ------------------------------------


def test_content_type_with_a_trailing_newline_is_refused(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = smtp_server(server_factory, smtp_sink)
    attachment = mail_pb2.Attachment(filename="a.txt", content_type="text/plain\n", content=b"x")
    err = send_fails(server, to=["a@example.com"], text="t", attachments=[attachment])
    info = assert_error(err, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert set(info["violations"]) == {"attachments[0].content_type"}
    nothing_arrives(smtp_sink)


@pytest.mark.parametrize("control", ["\x0b", "\x0c", "\x00", "\x7f", "\x85"])
def test_control_characters_are_refused_in_every_header_value(
    server_factory: ServerFactory, smtp_sink: SmtpSink, control: str
) -> None:
    server = smtp_server(server_factory, smtp_sink)
    err = send_fails(
        server,
        to=["a@example.com"],
        subject=f"Hi{control}there",
        reply_to=f"Re{control}ply <r@example.com>",
        text="t",
        attachments=[
            mail_pb2.Attachment(
                filename=f"a{control}.txt",
                content_type=f"text/plain{control}",
                content=b"x",
                content_id=f"c{control}",
            )
        ],
    )
    info = assert_error(err, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert set(info["violations"]) == {
        "subject",
        "reply_to",
        "attachments[0].filename",
        "attachments[0].content_type",
        "attachments[0].content_id",
    }
    nothing_arrives(smtp_sink)


# --- long header lines (issue 10 #12) -------------------------------------------------------


def test_long_subject_name_and_filename_arrive_folded(
    server_factory: ServerFactory, smtp_sink: SmtpSink
) -> None:
    server = smtp_server(server_factory, smtp_sink)
    subject = "S" * 1200
    name = "N" * 3000
    filename = "f" * 3000 + ".pdf"
    unicode_filename = "é" * 600 + ".txt"
    send(
        server,
        to=[f"{name} <alice@example.com>"],
        subject=subject,
        text="body",
        attachments=[
            mail_pb2.Attachment(filename=filename, content=b"%PDF"),
            mail_pb2.Attachment(filename=unicode_filename, content=b"text"),
        ],
    )
    (received,) = smtp_sink.wait_for(1)
    assert max(len(line) for line in received.raw.split(b"\r\n")) <= 998
    head = received.raw.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 80
    msg = received.message
    assert msg["Subject"] == subject
    assert [p.get_filename() for p in msg.iter_attachments()] == [filename, unicode_filename]
    assert received.rcpt_tos == ["alice@example.com"]
    raw_to = email.message_from_bytes(received.raw)["To"]
    decoded = str(email.header.make_header(email.header.decode_header(raw_to)))
    assert email.utils.parseaddr(decoded) == (name, "alice@example.com")


# --- Date and the final CRLF ------------------------------------------------------------------


def test_dev_outbox_mail_ends_with_crlf_and_a_numeric_date(server_factory: ServerFactory) -> None:
    server = server_factory("--dev")
    send(server, to=["a@example.com"], subject="dev", text="no final newline")
    outbox = server.data_dir / "outbox"
    deadline = time.monotonic() + 10
    while not list(outbox.glob("*.eml")) and time.monotonic() < deadline:
        time.sleep(0.02)
    (path,) = outbox.glob("*.eml")
    raw = path.read_bytes()
    assert raw.endswith(b"no final newline\r\n")
    (date,) = [line for line in raw.split(b"\r\n") if line.startswith(b"Date: ")]
    assert date.endswith(b" +0000"), date


# --- the Mailgun domain (issue 10 #15) --------------------------------------------------------


@pytest.mark.parametrize("domain", ["../../../other/path?x=", "mg.example.com/x", "a#b", "a b"])
def test_mailgun_domain_must_be_a_host_name(
    server_factory: ServerFactory, mailgun: MailgunStandIn, domain: str
) -> None:
    server = server_factory("--mailgun-base-url", mailgun.base_url)
    settings = settings_pb2.MailSettings(
        default_from=SENDER, mailgun=settings_pb2.MailgunSettings(domain=domain, key=MAILGUN_KEY)
    )
    with pytest.raises(grpc.RpcError) as caught:
        server.put_settings(settings)
    info = assert_error(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert set(info["violations"]) == {"settings.mailgun.domain"}
    assert mailgun.requests == []


def test_idna_mailgun_domain_is_accepted(
    server_factory: ServerFactory, mailgun: MailgunStandIn
) -> None:
    server = server_factory("--mailgun-base-url", mailgun.base_url)
    mg = settings_pb2.MailgunSettings(domain="bücher.example", key=MAILGUN_KEY)
    server.put_settings(settings_pb2.MailSettings(default_from=SENDER, mailgun=mg))
    send(server, to=["a@example.com"], text="t")
    assert [r.path for r in mailgun.requests] == ["/v3/xn--bcher-kva.example/messages"]


# --- SMTP credentials only over TLS (issue 10 #18) --------------------------------------------


def _loopback_name() -> str | None:
    """This machine's host name if it resolves to a loopback address without being one."""
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        return None
    if name in ("localhost", address) or not address.startswith("127."):
        return None
    return name


def test_login_is_not_sent_in_clear_to_a_host_name(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    name = _loopback_name()
    if name is None or socket.gethostbyname(name) != "127.0.0.1":
        pytest.skip("no host name resolving to 127.0.0.1 here (the unit tests cover the rule)")
    sink = smtp_factory(auth=True)  # offers AUTH, not STARTTLS
    server = server_factory()
    smtp = settings_pb2.SmtpSettings(
        host=name, port=sink.port, login=SMTP_LOGIN, password=SMTP_PASSWORD
    )
    server.put_settings(settings_pb2.MailSettings(default_from=SENDER, smtp=smtp))
    err = send_fails(server, to=["a@example.com"], text="t")
    assert_error(err, grpc.StatusCode.FAILED_PRECONDITION, "AUTH_WITHOUT_TLS")
    assert SMTP_PASSWORD not in f"{err.details()} {details(err)}"
    nothing_arrives(sink)


def test_login_to_a_loopback_address_still_works(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    sink = smtp_factory(auth=True)
    server = smtp_server(server_factory, sink, login=SMTP_LOGIN, password=SMTP_PASSWORD)
    assert send(server, to=["a@example.com"], text="t").transport == "smtp"
    assert len(sink.wait_for(1)) == 1


# --- TLS verification failures (issue 10 #19) -------------------------------------------------


class TlsMailgun:
    """An HTTPS Mailgun stand-in that counts TLS connections, failed handshakes included."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.connections = 0
        self.requests = 0
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                stand_in.requests += 1
                data = json.dumps({"id": f"<tls-{stand_in.requests}@mailgun.test>"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            def get_request(self) -> tuple[Any, Any]:
                conn, address = self.socket.accept()
                stand_in.connections += 1
                return context.wrap_socket(conn, server_side=True), address

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.base_url = f"https://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def tls_mailgun(server_ssl_context: ssl.SSLContext) -> Iterator[TlsMailgun]:
    stand_in = TlsMailgun(server_ssl_context)
    yield stand_in
    stand_in.close()


def mailgun_server(server_factory: ServerFactory, base_url: str, **kwargs: Any) -> Server:
    server = server_factory("--mailgun-base-url", base_url, **kwargs)
    mg = settings_pb2.MailgunSettings(domain=DOMAIN, key=MAILGUN_KEY)
    server.put_settings(settings_pb2.MailSettings(default_from=SENDER, mailgun=mg))
    return server


def test_mailgun_with_an_untrusted_certificate_is_a_tls_failure_not_retried(
    server_factory: ServerFactory, tls_mailgun: TlsMailgun
) -> None:
    server = mailgun_server(server_factory, tls_mailgun.base_url)
    err = send_fails(server, to=["a@example.com"], text="t")
    assert_error(err, grpc.StatusCode.FAILED_PRECONDITION, "TLS_VERIFY_FAILED")
    assert "certificate" in (err.details() or "")
    time.sleep(0.3)
    assert tls_mailgun.connections == 1
    assert tls_mailgun.requests == 0


def test_mailgun_with_a_trusted_certificate_delivers(
    server_factory: ServerFactory, tls_mailgun: TlsMailgun, ca_file: Path
) -> None:
    server = mailgun_server(
        server_factory, tls_mailgun.base_url, env={"SSL_CERT_FILE": str(ca_file)}
    )
    assert send(server, to=["a@example.com"], text="t").message_id == "<tls-1@mailgun.test>"


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_smtp_with_an_untrusted_certificate_is_a_tls_failure_not_retried(
    server_factory: ServerFactory, smtp_factory: SmtpFactory, mode: str
) -> None:
    sink = smtp_factory(mode)
    server = smtp_server(
        server_factory,
        sink,
        start_tls_required=mode == "starttls",
        ssl_on_connect=mode != "starttls",
    )
    err = send_fails(server, to=["a@example.com"], text="t")
    assert_error(err, grpc.StatusCode.FAILED_PRECONDITION, "TLS_VERIFY_FAILED")
    nothing_arrives(sink)


# --- sends whose outcome is unknown -----------------------------------------------------------


def test_mailgun_reply_lost_is_delivery_uncertain_and_not_retried(
    server_factory: ServerFactory, mailgun: MailgunStandIn
) -> None:
    server = mailgun_server(server_factory, mailgun.base_url)
    mailgun.hang_up = True
    err = send_fails(server, to=["a@example.com"], text="t")
    assert_error(err, grpc.StatusCode.UNAVAILABLE, "DELIVERY_UNCERTAIN")
    time.sleep(0.3)
    assert len(mailgun.requests) == 1


class HangUpInData:
    """Takes the mail, then drops the connection instead of answering DATA."""

    def __init__(self) -> None:
        self.data_commands = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.data_commands += 1
        server.transport.close()
        return "250 OK"


def test_smtp_connection_lost_in_data_is_uncertain_and_not_failed_over(
    server_factory: ServerFactory, mailgun: MailgunStandIn
) -> None:
    from aiosmtpd.controller import Controller

    from tests.conftest import free_port

    handler = HangUpInData()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        server = server_factory("--mailgun-base-url", mailgun.base_url)
        settings = settings_pb2.MailSettings(
            default_from=SENDER,
            smtp=settings_pb2.SmtpSettings(host="127.0.0.1", port=port),
            mailgun=settings_pb2.MailgunSettings(domain=DOMAIN, key=MAILGUN_KEY),
        )
        server.put_settings(settings)
        err = send_fails(server, to=["a@example.com"], text="t")
        assert_error(err, grpc.StatusCode.UNAVAILABLE, "DELIVERY_UNCERTAIN")
        time.sleep(0.3)
        assert handler.data_commands == 1
        assert mailgun.requests == []
    finally:
        controller.stop()
