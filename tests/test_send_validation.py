"""SendMail requests that must be refused before anything is sent."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from mailsvc.v1 import mail_pb2, settings_pb2

from tests.conftest import ADMIN, Server, SmtpSink, details, smtp_settings
from tests.helpers import ServerFactory, SmtpFactory, send, send_fails

SENDER = "sender@example.com"
VALID: dict[str, Any] = {"to": ["alice@example.com"], "subject": "Hello", "text": "Hi there"}


@pytest.fixture(scope="module", autouse=True)
def send_through_shared_sink(shared_server: Server, shared_sink: SmtpSink) -> None:
    """conftest's module server sends through its module sink, for every test here."""
    settings = settings_pb2.MailSettings(default_from=SENDER, smtp=smtp_settings(shared_sink))
    shared_server.put_settings(settings)


def attachment(**fields: Any) -> mail_pb2.Attachment:
    values: dict[str, Any] = {
        "filename": "notes.txt",
        "content_type": "text/plain",
        "content": b"some notes\n",
    }
    values.update(fields)
    return mail_pb2.Attachment(**values)


def test_valid_request_is_sent(shared_server: Server, shared_sink: SmtpSink) -> None:
    """The baseline the invalid cases change one field of: on its own, it is delivered."""
    before = len(shared_sink.received)

    response = send(
        shared_server,
        **VALID,
        cc=["carol@example.net"],
        bcc=["dave@example.org"],
        reply_to="support@example.org",
        html="<p>Hi there</p>",
        attachments=[
            attachment(),
            attachment(
                filename="logo.png", content_type="image/png", content=b"\x89PNG", content_id="logo"
            ),
        ],
    )

    assert response.transport == "smtp"
    assert len(shared_sink.wait_for(before + 1)) == before + 1


INVALID = [
    pytest.param({"to": []}, "to", id="no-to"),
    pytest.param({"to": ["alice@example.com", "not-an-address"]}, "to[1]", id="bad-to-1"),
    pytest.param({"to": ["alice@example.com", ""]}, "to[1]", id="empty-to-1"),
    pytest.param({"cc": ["carol@"]}, "cc[0]", id="bad-cc"),
    pytest.param({"bcc": ["@example.org"]}, "bcc[0]", id="bad-bcc"),
    pytest.param({"reply_to": "support at example.org"}, "reply_to", id="bad-reply-to"),
    pytest.param({"to": ["a@x.test, b@y.test"]}, "to[0]", id="two-addresses-in-one-to"),
    pytest.param({"subject": "Hi\r\nBcc: evil@x.test"}, "subject", id="crlf-in-subject"),
    pytest.param({"subject": "Hi\nBcc: evil@x.test"}, "subject", id="lf-in-subject"),
    pytest.param({"subject": "Hi\rBcc: evil@x.test"}, "subject", id="cr-in-subject"),
    pytest.param({"to": ["a@x.test\r\nBcc: evil@x.test"]}, "to[0]", id="crlf-in-to"),
    pytest.param({"cc": ["c@x.test\nBcc: evil@x.test"]}, "cc[0]", id="lf-in-cc"),
    pytest.param({"reply_to": "r@x.test\r\nBcc: evil@x.test"}, "reply_to", id="crlf-in-reply-to"),
    pytest.param({"text": "", "html": ""}, "text", id="no-body"),
    pytest.param(
        {"attachments": [attachment(filename="a\r\nb.txt")]},
        "attachments[0].filename",
        id="crlf-in-filename",
    ),
    pytest.param(
        {"attachments": [attachment(content_type="not a type")]},
        "attachments[0].content_type",
        id="bad-content-type",
    ),
    pytest.param(
        {"attachments": [attachment(content_id="logo\r\nX-Evil: 1")]},
        "attachments[0].content_id",
        id="crlf-in-content-id",
    ),
]


@pytest.mark.parametrize(("change", "field"), INVALID)
def test_invalid_request_sends_nothing(
    shared_server: Server, shared_sink: SmtpSink, change: dict[str, Any], field: str
) -> None:
    before = len(shared_sink.received)
    fields = {**VALID, **change}

    err = send_fails(shared_server, **fields)

    info = details(err)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert set(info["violations"]) == {field}, info
    assert info["violations"][field], "the violation says what is wrong"
    assert info["reason"] == "INVALID_ARGUMENT", info
    assert info.get("domain") == "mailsvc", info
    assert len(shared_sink.received) == before


def test_message_over_size_limit_is_resource_exhausted(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    sink = smtp_factory()
    server = server_factory("--max-message-bytes", "2000")
    server.put_settings(settings_pb2.MailSettings(default_from=SENDER, smtp=smtp_settings(sink)))
    big = attachment(
        filename="big.bin", content_type="application/octet-stream", content=bytes(5000)
    )

    err = send_fails(server, **VALID, attachments=[big])

    info = details(err)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert info["reason"] == "MESSAGE_TOO_LARGE", info
    assert sink.received == []
    # A mail within the limit still goes through.
    send(server, **VALID)
    assert len(sink.wait_for(1)) == 1


def test_no_transport_is_failed_precondition(server: Server) -> None:
    err = send_fails(server, **VALID)

    info = details(err)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert info["reason"] == "NO_TRANSPORT", info
    assert "transport" in err.details().lower()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        pytest.param(
            {"to": [f"r{i}@example.com" for i in range(600)], "cc": ["c@example.com"] * 401},
            "to",
            id="1001-recipients",
        ),
        pytest.param(
            {"attachments": [mail_pb2.Attachment(filename=f"{i}.txt") for i in range(101)]},
            "attachments",
            id="101-attachments",
        ),
    ],
)
def test_too_many_recipients_or_attachments_is_one_clear_violation(
    shared_server: Server, shared_sink: SmtpSink, fields: dict[str, Any], field: str
) -> None:
    before = len(shared_sink.received)
    request = {**VALID, **fields}

    err = send_fails(shared_server, **request)

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    violations = details(err)["violations"]
    assert list(violations) == [field], violations
    assert "at most" in violations[field]
    assert len(shared_sink.received) == before


def test_requests_held_at_once_are_bounded_by_max_request_memory(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    """While slow sends hold 3 MB requests, a fourth that would pass the 8 MB budget is refused
    at once instead of being kept in memory; once they are done, it goes through."""
    sink = smtp_factory(delay=2.0)
    server = server_factory("--max-request-memory", str(8 * 1024 * 1024))
    server.put_settings(settings_pb2.MailSettings(default_from=SENDER, smtp=smtp_settings(sink)))
    payload = attachment(filename="big.bin", content=bytes(3 * 1024 * 1024))
    request = mail_pb2.SendMailRequest(**VALID, attachments=[payload])
    held = [server.mail.SendMail.future(request, metadata=ADMIN, timeout=30) for _ in range(2)]
    sink.wait_data(2)

    err = send_fails(server, request)

    info = details(err)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert info["reason"] == "TOO_MUCH_REQUEST_DATA_IN_FLIGHT", info
    for call in held:
        call.result()
    send(server, request, timeout=30)
    assert len(sink.wait_for(3)) == 3
