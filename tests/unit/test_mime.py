"""MIME building and header-value checks, without a server."""

from __future__ import annotations

import email
import email.policy
import email.utils
from email.header import decode_header, make_header
from email.message import EmailMessage

import pytest

from mailsvc.addresses import Address, is_mime_type
from mailsvc.compose import MailRequest, check_mail
from mailsvc.errors import InvalidArgument
from mailsvc.message import Attachment, Mail
from mailsvc.mime import _POLICY, _flatten, build_mime, date_header, message_tree

SENDER = Address("Sender", "sender@example.com")
TO = (Address("", "to@example.com"),)


def mail(**kwargs: object) -> Mail:
    fields: dict[str, object] = {"sender": SENDER, "to": TO, "subject": "hi", "text": "body"}
    fields.update(kwargs)
    return Mail(**fields)  # type: ignore[arg-type]


def parsed(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def headers_of(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def assert_well_formed(raw: bytes) -> None:
    assert raw.endswith(b"\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in raw.replace(b"\r\n", b""), "bare CR"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def test_headers_and_bcc_never_written() -> None:
    raw = build_mime(
        mail(
            cc=(Address("Carl", "cc@example.com"),),
            bcc=(Address("Hidden", "hidden@example.com"),),
            reply_to=Address("", "reply@example.com"),
        ),
        "<id@example.com>",
    )
    msg = parsed(raw)
    assert msg["From"] == "Sender <sender@example.com>"
    assert msg["To"] == "to@example.com"
    assert msg["Cc"] == "Carl <cc@example.com>"
    assert msg["Reply-To"] == "reply@example.com"
    assert msg["Message-ID"] == "<id@example.com>"
    assert msg["MIME-Version"] == "1.0"
    assert "Bcc" not in msg
    assert b"hidden" not in raw.lower()


def test_short_headers_are_written_on_one_line() -> None:
    raw = build_mime(mail(subject="Hello there"), "<id@example.com>")
    lines = headers_of(raw)
    assert b"Subject: Hello there" in lines
    assert b"From: Sender <sender@example.com>" in lines
    assert b"To: to@example.com" in lines


def test_date_is_utc_with_a_numeric_zone() -> None:
    assert date_header(0) == "Thu, 01 Jan 1970 00:00:00 +0000"
    raw = build_mime(mail(), "<id@example.com>")
    (date,) = [line for line in headers_of(raw) if line.startswith(b"Date: ")]
    assert date.endswith(b" +0000")
    assert b"GMT" not in date
    assert email.utils.parsedate_to_datetime(date[6:].decode()).utcoffset() is not None


@pytest.mark.parametrize(
    "fields",
    [
        {"text": "no final newline"},
        {"text": "", "html": "<p>html only</p>"},
        {"text": "ünïcödé without newline"},
        {"text": "t", "html": "<p>h</p>"},
        {"attachments": (Attachment("a.txt", "text/plain", b"x"),)},
        {"text": "ends\n"},
    ],
)
def test_every_message_ends_with_crlf(fields: dict[str, object]) -> None:
    raw = build_mime(mail(**fields), "<id@example.com>")
    assert_well_formed(raw)
    assert not raw.endswith(b"\r\n\r\n\r\n")


def test_single_part_body_keeps_its_text() -> None:
    msg = parsed(build_mime(mail(text="line 1\nline 2"), "<id@example.com>"))
    assert msg.get_content().replace("\r\n", "\n") == "line 1\nline 2\n"


def test_parts_text_html_inline_and_attachment() -> None:
    raw = build_mime(
        mail(
            text="plain",
            html='<img src="cid:logo">',
            attachments=(
                Attachment("logo.png", "image/png", b"\x89PNG", "logo"),
                Attachment("r.pdf", "application/pdf", b"%PDF"),
            ),
        ),
        "<id@example.com>",
    )
    assert_well_formed(raw)
    msg = parsed(raw)
    assert msg.get_content_type() == "multipart/mixed"
    types = [p.get_content_type() for p in msg.walk()]
    assert types == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "multipart/related",
        "text/html",
        "image/png",
        "application/pdf",
    ]
    inline = next(p for p in msg.walk() if p.get_content_type() == "image/png")
    assert inline["Content-ID"] == "<logo>"
    assert inline.get_content_disposition() == "inline"
    assert inline.get_filename() == "logo.png"
    pdf = next(p for p in msg.walk() if p.get_content_type() == "application/pdf")
    assert pdf.get_content_disposition() == "attachment"
    assert pdf.get_payload(decode=True) == b"%PDF"
    assert sum(1 for line in headers_of(raw) if line.startswith(b"MIME-Version")) == 1


@pytest.mark.parametrize(
    "subject",
    [
        "x" * 1200,
        "é" * 1200,
        "word " * 300,
        "Your order  has shipped, and will arrive on Tuesday " * 20,
        "=?utf-8?q?not_an_encoded_word?=",
        "a" * 69 + " " + "b" * 200,
    ],
)
def test_long_subjects_are_folded_and_decode_back(subject: str) -> None:
    raw = build_mime(mail(subject=subject), "<id@example.com>")
    assert_well_formed(raw)
    assert max(len(line) for line in headers_of(raw)) <= 80
    assert parsed(raw)["Subject"] == subject


def test_ascii_subject_with_spaces_is_folded_not_encoded() -> None:
    subject = "Your order has shipped and will arrive on Tuesday " * 4
    raw = build_mime(mail(subject=subject.strip()), "<id@example.com>")
    assert b"=?" not in raw
    assert max(len(line) for line in headers_of(raw)) <= 78


@pytest.mark.parametrize("name", ["N" * 3000, "Ünïcödé Nämé x" * 100, "=?x?q?y?=", 'A "q" \\ b'])
def test_long_display_names_are_encoded_and_folded(name: str) -> None:
    raw = build_mime(
        mail(sender=Address(name, "s@example.com"), to=(Address(name, "t@example.com"), *TO)),
        "<id@example.com>",
    )
    assert_well_formed(raw)
    assert max(len(line) for line in headers_of(raw)) <= 80
    # RFC 2047 decoding drops the whitespace between encoded words (policy.default's address
    # parser keeps it, so the raw header is decoded here).
    raw_from = email.message_from_bytes(raw)["From"]
    from_value = str(make_header(decode_header(raw_from)))
    assert email.utils.parseaddr(from_value) == (name, "s@example.com")
    addresses = parsed(raw)["To"].addresses
    assert [a.addr_spec for a in addresses] == ["t@example.com", "to@example.com"]


def test_many_recipients_are_folded_between_addresses() -> None:
    to = tuple(Address("", f"user{i}@example.com") for i in range(300))
    raw = build_mime(mail(to=to), "<id@example.com>")
    assert_well_formed(raw)
    assert max(len(line) for line in headers_of(raw)) <= 78
    assert [a.addr_spec for a in parsed(raw)["To"].addresses] == [a.addr for a in to]


@pytest.mark.parametrize(
    "filename",
    ["f" * 3000 + ".pdf", "é" * 800 + ".txt", "rapport été.pdf", 'q"uote\\d.txt', "a b;c=d.txt"],
)
def test_file_names_of_any_length_decode_back(filename: str) -> None:
    attachment = Attachment(filename, "application/octet-stream", b"data")
    raw = build_mime(mail(attachments=(attachment,)), "<id@example.com>")
    assert_well_formed(raw)
    assert max(len(line) for line in headers_of(raw)) <= 78
    (part,) = parsed(raw).iter_attachments()
    assert part.get_filename() == filename
    assert part.get_payload(decode=True) == b"data"


# --- header values and MIME types ----------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["text/plain", "application/vnd.ms-excel", "image/svg+xml", "APPLICATION/PDF"]
)
def test_mime_types(value: str) -> None:
    assert is_mime_type(value)


@pytest.mark.parametrize(
    "value",
    ["text/plain\n", "text/plain\r\n", "text/plain\x00", "text/pl\x0bain", "text/plain\x0c",
     "text/plain\x7f", "text/plain; charset=utf-8", "text", "/plain", "text/", "text/plain/x",
     "te xt/plain", "text/" + "x" * 128, "ünï/code"],
)  # fmt: skip
def test_not_mime_types(value: str) -> None:
    assert not is_mime_type(value)


CONTROLS = ["\n", "\r", "\x00", "\x0b", "\x0c", "\x7f", "\x85", "\u2028", "\t"]


def violations(request: MailRequest) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        check_mail(request)
    return {v.field: v.description for v in caught.value.violations}


@pytest.mark.parametrize("control", CONTROLS)
def test_control_characters_are_refused_in_every_header_value(control: str) -> None:
    bad = violations(
        MailRequest(
            to=[f"Al{control}ice <alice@example.com>"],
            cc=[f"c@example.com{control}"],
            subject=f"Hi{control}Bcc: x@example.com",
            text="t",
            reply_to=f"Re{control}ply <r@example.com>",
            attachments=[
                (f"a{control}.txt", f"text/plain{control}", b"x", f"cid{control}"),
                ("b.txt", f"text/{control}plain", b"x", ""),
            ],
            sender=SENDER,
        )
    )
    assert set(bad) == {
        "to[0]",
        "cc[0]",
        "subject",
        "reply_to",
        "attachments[0].filename",
        "attachments[0].content_type",
        "attachments[0].content_id",
        "attachments[1].content_type",
    }
    assert all(control not in description for description in bad.values())


def test_trailing_newline_in_content_type_is_refused() -> None:
    bad = violations(
        MailRequest(
            to=["a@example.com"], text="t", attachments=[("a.txt", "text/plain\n", b"x", "")]
        )
    )
    assert "attachments[0].content_type" in bad


def test_overlong_content_id_is_refused() -> None:
    bad = violations(
        MailRequest(
            to=["a@example.com"],
            text="t",
            attachments=[("a.png", "", b"x", "c" * 251)],
            sender=SENDER,
        )
    )
    assert set(bad) == {"attachments[0].content_id"}


def test_valid_request_passes() -> None:
    result = check_mail(
        MailRequest(
            to=["Alice <alice@example.com>"],
            subject="Ünïcödé " * 200,
            text="t\twith a tab in the body",
            attachments=[("é" * 500 + ".pdf", "", b"x", ""), ("a", "Text/Plain", b"y", "c1")],
            sender=SENDER,
        )
    )
    assert [a.content_type for a in result.attachments] == ["application/pdf", "text/plain"]


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"text": "", "html": "<p>html only</p>"},
        {"text": "t\r\nwith\rodd\nline ends", "html": "<p>h</p>"},
        {"text": "ünïcödé\n" * 40, "html": "<p>" + "é" * 2000 + "</p>"},
        {"text": "x" * 3000},
        {"subject": "é" * 300, "to": (Address("Ünïcödé Name " * 8, "to@example.com"),) * 30},
        {
            "html": '<img src="cid:logo">',
            "cc": (Address("", "cc@example.com"),),
            "reply_to": Address("Reply", "r@example.com"),
            "attachments": (
                Attachment("logo.png", "image/png", b"\x89PNG" * 100, "logo"),
                Attachment("é" * 100 + ".pdf", "application/pdf", b"%PDF" * 1000),
            ),
        },
        {"attachments": (Attachment("a.txt", "text/plain", b""),)},
    ],
)
def test_written_as_the_email_generator_writes_it(fields: dict[str, object]) -> None:
    """build_mime writes the tree itself, for speed: byte for byte what email's generator
    writes from the same tree."""
    tree = message_tree(mail(**fields), "<id@example.com>")
    out: list[bytes] = []
    _flatten(tree, out)
    raw = b"".join(out)
    assert raw == tree.as_bytes(policy=_POLICY)
    assert_well_formed(raw)
    assert sum(1 for line in raw.split(b"\r\n") if line.startswith(b"MIME-Version")) == 1
