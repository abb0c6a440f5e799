"""A queued mail as bytes and back: deterministic, compact, and read back without revalidation.

Layout (version 1): a version byte, then fields in a fixed order; a string or byte string is
a varint length and its bytes, a list is a varint count and its items, an address is its
display name and its addr-spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailsvc.addresses import Address
from mailsvc.message import Attachment, Mail

VERSION = 1


class PayloadError(ValueError):
    """Bytes that are not a payload this version can read."""


@dataclass(frozen=True)
class QueuedMail:
    """What a queued attempt sends: the mail, and the Message-ID header every attempt reuses."""

    mail: Mail
    header_message_id: str


class _Writer:
    def __init__(self) -> None:
        self.out = bytearray([VERSION])

    def varint(self, n: int) -> None:
        while n >= 0x80:
            self.out.append((n & 0x7F) | 0x80)
            n >>= 7
        self.out.append(n)

    def blob(self, data: bytes) -> None:
        self.varint(len(data))
        self.out += data

    def text(self, value: str) -> None:
        self.blob(value.encode("utf-8", "surrogatepass"))

    def address(self, a: Address) -> None:
        self.text(a.name)
        self.text(a.addr)

    def addresses(self, values: tuple[Address, ...]) -> None:
        self.varint(len(values))
        for a in values:
            self.address(a)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def varint(self) -> int:
        n = shift = 0
        while True:
            if self.pos >= len(self.data) or shift > 63:
                raise PayloadError("truncated payload")
            b = self.data[self.pos]
            self.pos += 1
            n |= (b & 0x7F) << shift
            if b < 0x80:
                return n
            shift += 7

    def blob(self) -> bytes:
        n = self.varint()
        end = self.pos + n
        if end > len(self.data):
            raise PayloadError("truncated payload")
        value = bytes(self.data[self.pos : end])
        self.pos = end
        return value

    def text(self) -> str:
        try:
            return self.blob().decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise PayloadError("bad text in payload") from None

    def address(self) -> Address:
        name = self.text()
        return Address(name, self.text())

    def addresses(self) -> tuple[Address, ...]:
        return tuple(self.address() for _ in range(self.varint()))


def encode(mail: Mail, header_message_id: str) -> bytes:
    w = _Writer()
    w.text(header_message_id)
    w.address(mail.sender)
    w.addresses(mail.to)
    w.addresses(mail.cc)
    w.addresses(mail.bcc)
    w.text(mail.subject)
    w.text(mail.text)
    w.text(mail.html)
    w.addresses((mail.reply_to,) if mail.reply_to else ())
    w.varint(len(mail.attachments))
    for a in mail.attachments:
        w.text(a.filename)
        w.text(a.content_type)
        w.blob(a.content)
        w.text(a.content_id)
    return bytes(w.out)


def decode(data: bytes) -> QueuedMail:
    if not data or data[0] != VERSION:
        raise PayloadError(f"payload version {data[0] if data else None} is not {VERSION}")
    r = _Reader(data)
    r.pos = 1
    header_message_id = r.text()
    sender = r.address()
    to, cc, bcc = r.addresses(), r.addresses(), r.addresses()
    subject, text, html = r.text(), r.text(), r.text()
    reply_to = r.addresses()
    attachments = tuple(
        Attachment(r.text(), r.text(), r.blob(), r.text()) for _ in range(r.varint())
    )
    if r.pos != len(r.data):
        raise PayloadError("trailing bytes in payload")
    if len(reply_to) > 1:
        raise PayloadError("more than one Reply-To in payload")
    mail = Mail(
        sender=sender,
        to=to,
        cc=cc,
        bcc=bcc,
        subject=subject,
        text=text,
        html=html,
        reply_to=reply_to[0] if reply_to else None,
        attachments=attachments,
    )
    return QueuedMail(mail, header_message_id)
