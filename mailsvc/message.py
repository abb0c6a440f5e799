"""Addresses, the validated mail, and its MIME form."""

from __future__ import annotations

import mimetypes
import random
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from email import encoders, quoprimime
from email.header import Header
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.policy import Compat32
from email.utils import formataddr, formatdate
from functools import lru_cache

from email_validator import EmailNotValidError, validate_email

from mailsvc.errors import FieldViolation, InvalidArgument


class _FastFold(Compat32):
    """compat32, minus the Header machinery for the common case of an ASCII line.

    Folding is most of the cost of generating a mail; a line that needs none is written as is.
    """

    def _short(self, name: str, value: object) -> str | None:
        # 998 is the hard limit of RFC 5322; lines up to it are legal, if not pretty.
        if isinstance(value, str) and value.isascii() and len(name) + len(value) < 990:
            return f"{name}: {value}{self.linesep}"
        return None

    def fold(self, name: str, value: str) -> str:
        return self._short(name, value) or super().fold(name, value)

    def fold_binary(self, name: str, value: str) -> bytes:
        short = self._short(name, value)
        return short.encode("ascii") if short else super().fold_binary(name, value)


_POLICY = _FastFold(linesep="\r\n")

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 2045 token, for MIME types


@dataclass(frozen=True)
class Address:
    """One mailbox: an optional display name and the ASCII addr-spec used in the envelope."""

    name: str
    addr: str

    def header(self) -> str:
        return formataddr((self.name, self.addr), charset="utf-8") if self.name else self.addr

    def __str__(self) -> str:
        return formataddr((self.name, self.addr)) if self.name else self.addr


@lru_cache(maxsize=4096)
def _parse_address(value: str) -> Address | None:
    try:
        result = validate_email(
            value,
            check_deliverability=False,
            allow_display_name=True,
            allow_smtputf8=False,
            test_environment=True,
            globally_deliverable=False,
        )
    except EmailNotValidError:
        return None
    return Address(result.display_name or "", result.ascii_email or result.normalized)


def has_crlf(value: str) -> bool:
    return "\r" in value or "\n" in value


def parse_address(value: str, field_path: str, violations: list[FieldViolation]) -> Address | None:
    """Parse one address (`addr` or `Name <addr>`); a bad one is recorded in `violations`."""
    if has_crlf(value):
        violations.append(FieldViolation(field_path, "must not contain CR or LF"))
        return None
    address = _parse_address(value.strip())
    if address is None:
        violations.append(
            FieldViolation(field_path, f"{value!r} is not a single valid email address")
        )
    return address


def parse_addresses(
    values: Iterable[str], field_path: str, violations: list[FieldViolation]
) -> tuple[Address, ...]:
    parsed = (parse_address(v, f"{field_path}[{i}]", violations) for i, v in enumerate(values))
    return tuple(a for a in parsed if a is not None)


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    content: bytes
    content_id: str = ""

    @property
    def inline(self) -> bool:
        return bool(self.content_id)


@dataclass(frozen=True, kw_only=True)
class Mail:
    """A mail that passed validation: what every transport sends."""

    sender: Address
    to: tuple[Address, ...]
    cc: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()
    subject: str = ""
    text: str = ""
    html: str = ""
    reply_to: Address | None = None
    attachments: tuple[Attachment, ...] = field(default=())

    @property
    def recipients(self) -> list[str]:
        """Envelope recipients, each once, in order."""
        return list(dict.fromkeys(a.addr for a in (*self.to, *self.cc, *self.bcc)))

    def estimated_size(self) -> int:
        """An upper estimate of the encoded size; bodies and files are encoded at most 4/3."""
        payload = len(self.text.encode()) + len(self.html.encode())
        payload += sum(len(a.content) for a in self.attachments)
        return 2048 + payload * 4 // 3 * 78 // 76


def check_attachments(
    attachments: Iterable[tuple[str, str, bytes, str]], violations: list[FieldViolation]
) -> tuple[Attachment, ...]:
    """Validate (filename, content_type, content, content_id) tuples."""
    out = []
    for i, (filename, content_type, content, content_id) in enumerate(attachments):
        path = f"attachments[{i}]"
        ok = True
        if not filename.strip() or has_crlf(filename) or "\0" in filename:
            violations.append(FieldViolation(f"{path}.filename", "required, without CR, LF or NUL"))
            ok = False
        if has_crlf(content_id) or any(c in content_id for c in "<> "):
            violations.append(
                FieldViolation(f"{path}.content_id", "must not contain CR, LF, spaces or <>")
            )
            ok = False
        if content_type:
            main, _, sub = content_type.partition("/")
            if not (_TOKEN.match(main) and _TOKEN.match(sub)):
                violations.append(
                    FieldViolation(f"{path}.content_type", f"{content_type!r} is not a MIME type")
                )
                ok = False
        else:
            content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if ok:
            out.append(Attachment(filename, content_type.lower(), content, content_id))
    return tuple(out)


def check_header_text(value: str, field_path: str, violations: list[FieldViolation]) -> None:
    if has_crlf(value):
        violations.append(FieldViolation(field_path, "must not contain CR or LF"))


def raise_if(violations: list[FieldViolation]) -> None:
    if violations:
        raise InvalidArgument(violations)


def new_message_id(sender: Address) -> str:
    # Unique, not secret: 128 random bits from the seeded generator cost no system call,
    # unlike make_msgid (getpid) or uuid4 (urandom), and the send path is syscall-bound.
    domain = sender.addr.rpartition("@")[2] or "localhost"
    return f"<{time.time_ns():x}.{random.getrandbits(128):032x}@{domain}>"


def _multipart(subtype: str) -> MIMEMultipart:
    # 128 random bits cannot turn up in a body by chance, so the generator need not search
    # the parts for a clash (a regular expression compiled per message).
    return MIMEMultipart(subtype, boundary=f"=_{random.getrandbits(128):032x}")


def _seven_bit(body: str) -> bool:
    return body.isascii() and "\r" not in body and all(len(x) < 990 for x in body.split("\n"))


def _text_part(body: str, subtype: str) -> Message:
    """A text part: plain 7bit when it can be, else UTF-8 quoted-printable."""
    part = Message()
    if _seven_bit(body):
        part["Content-Type"] = f'text/{subtype}; charset="us-ascii"'
        part["Content-Transfer-Encoding"] = "7bit"
        part.set_payload(body)
    else:
        part["Content-Type"] = f'text/{subtype}; charset="utf-8"'
        part["Content-Transfer-Encoding"] = "quoted-printable"
        # quoprimime encodes code points below 256 as bytes: hand it the UTF-8 bytes so.
        part.set_payload(quoprimime.body_encode(body.encode().decode("latin-1")))
    return part


def _file_part(attachment: Attachment) -> MIMEBase:
    main, _, sub = attachment.content_type.partition("/")
    part = MIMEBase(main, sub)
    part.set_payload(attachment.content)
    encoders.encode_base64(part)
    filename: str | tuple[str, str, str] = attachment.filename
    if not attachment.filename.isascii():
        filename = ("utf-8", "", attachment.filename)
    disposition = "inline" if attachment.inline else "attachment"
    part.add_header("Content-Disposition", disposition, filename=filename)
    if attachment.inline:
        part["Content-ID"] = f"<{attachment.content_id}>"
    return part


def _body(mail: Mail) -> Message:
    inline = [a for a in mail.attachments if a.inline]
    html: Message | None = None
    if mail.html:
        html = _text_part(mail.html, "html")
        if inline:
            related = _multipart("related")
            related.attach(html)
            for a in inline:
                related.attach(_file_part(a))
            html = related
    if html is None:
        return _text_part(mail.text, "plain")
    if not mail.text:
        return html
    alternative = _multipart("alternative")
    alternative.attach(_text_part(mail.text, "plain"))
    alternative.attach(html)
    return alternative


def build_mime(mail: Mail, message_id: str) -> bytes:
    """The message as sent: headers (never Bcc) and parts; lines end in CRLF."""
    root = _body(mail)
    files = [a for a in mail.attachments if not (a.inline and mail.html)]
    if files:
        mixed = _multipart("mixed")
        mixed.attach(root)
        for a in files:
            mixed.attach(_file_part(a))
        root = mixed
    for part in root.walk():
        if part is not root:
            del part["MIME-Version"]
    root["From"] = mail.sender.header()
    root["To"] = ", ".join(a.header() for a in mail.to)
    if mail.cc:
        root["Cc"] = ", ".join(a.header() for a in mail.cc)
    if mail.reply_to:
        root["Reply-To"] = mail.reply_to.header()
    subject = mail.subject
    root["Subject"] = subject if subject.isascii() else Header(subject, "utf-8").encode()
    root["Date"] = formatdate(usegmt=True)
    root["Message-ID"] = message_id
    if "MIME-Version" not in root:
        root["MIME-Version"] = "1.0"
    return root.as_bytes(policy=_POLICY)
