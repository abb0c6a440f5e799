"""A queued mail survives the trip to bytes and back, exactly."""

from __future__ import annotations

import pytest

from mailsvc import payload
from mailsvc.addresses import Address
from mailsvc.message import Attachment, Mail

MAIL = Mail(
    sender=Address("Shop", "shop@example.org"),
    to=(Address("Bob Ünïcode", "bob@example.org"), Address("", "x@example.org")),
    cc=(Address("", "cc@example.org"),),
    bcc=(Address("", "hidden@example.org"),),
    subject="Hello, ☃",
    text="plain\nbody",
    html="<p>html</p>",
    reply_to=Address("Help", "help@example.org"),
    attachments=(
        Attachment("a.pdf", "application/pdf", bytes(range(256)) * 10),
        Attachment("logo.png", "image/png", b"\x89PNG", content_id="logo"),
    ),
)


def test_round_trip_is_exact() -> None:
    data = payload.encode(MAIL, "<id@example.org>")
    assert payload.decode(data) == payload.QueuedMail(MAIL, "<id@example.org>")


def test_minimal_mail_round_trips() -> None:
    mail = Mail(sender=Address("", "a@b.org"), to=(Address("", "c@d.org"),), text="x")
    assert payload.decode(payload.encode(mail, "")).mail == mail


def test_encoding_is_deterministic_and_compact() -> None:
    data = payload.encode(MAIL, "<id@example.org>")
    assert data == payload.encode(MAIL, "<id@example.org>")
    content = sum(len(a.content) for a in MAIL.attachments)
    assert len(data) < content + 300


@pytest.mark.parametrize("cut", [0, 1, 5, 50, -1])
def test_truncated_or_foreign_bytes_are_refused(cut: int) -> None:
    data = payload.encode(MAIL, "<id@example.org>")
    with pytest.raises(payload.PayloadError):
        payload.decode(data[:cut])
    with pytest.raises(payload.PayloadError):
        payload.decode(b"\x09" + data[1:])
    with pytest.raises(payload.PayloadError):
        payload.decode(data + b"\x00")
