"""The MIME form of a validated mail: headers (never Bcc), parts, CRLF line ends.

Every line of the result is at most 998 octets (RFC 5322 2.1.1), and header lines are kept to
78 where they can be folded: long text is folded at spaces or written as RFC 2047 encoded
words, long file names as RFC 2231 continuations.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from email import encoders, quoprimime
from email.header import Header
from email.message import Message
from email.mime.base import MIMEBase
from email.policy import Compat32
from email.utils import format_datetime, formataddr
from functools import lru_cache
from urllib.parse import quote

from mailsvc.addresses import Address
from mailsvc.message import Attachment, Mail

LINE = 78  # RFC 5322's recommended line length for headers
WORD = 70  # longest word or encoded word we put on a line of its own
SIMPLE = 60  # longer names and file names are encoded, so that they can be folded
# RFC 2231 attribute-char: a token character other than *, ' and % (quote() keeps -._~ too).
_ATTRIBUTE_CHARS = "!#$&+^`{|}"


class _Folded(str):
    """A header value that is already folded (CRLF + space) into lines of at most 998."""


class _FastFold(Compat32):
    """compat32, minus the Header machinery: our values come short or folded already.

    Folding is most of the cost of generating a mail; a line that needs none is written as is.
    """

    def _short(self, name: str, value: object) -> str | None:
        if isinstance(value, _Folded):
            return f"{name}: {value}{self.linesep}"
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
_NEWLINE = re.compile(r"\r\n|\r|\n")  # what the generator writes as its linesep
_FOLD = _POLICY.linesep + " "


def new_message_id(sender: Address) -> str:
    # Unique, not secret: 128 random bits from the seeded generator cost no system call,
    # unlike make_msgid (getpid) or uuid4 (urandom), and the send path is syscall-bound.
    domain = sender.addr.rpartition("@")[2] or "localhost"
    return f"<{time.time_ns():x}.{random.getrandbits(128):032x}@{domain}>"


@lru_cache(maxsize=1)
def _date(second: int) -> str:
    # Numeric zone: RFC 5322 4.3 lists "GMT" among the obsolete zone names.
    return format_datetime(datetime.fromtimestamp(second, UTC))


def date_header(now: float | None = None) -> str:
    """The Date header's value, in UTC with a `+0000` zone."""
    return _date(int(time.time() if now is None else now))


def _encoded_words(text: str) -> list[str]:
    """`text` as RFC 2047 UTF-8 encoded words, each short enough for a line of its own."""
    return Header(text, "utf-8").encode(maxlinelen=WORD, linesep="\n").split("\n ")


def _fold_words(name: str, words: Iterable[str], separator: str = " ") -> str:
    """Join words with `separator`, breaking the line before a word that would pass LINE."""
    out: list[str] = []
    width = len(name) + 2
    for word in words:
        if out:
            if word and width + len(separator) + len(word) > LINE:
                out.append(separator.rstrip() + _FOLD)
                width = 1
            else:
                out.append(separator)
                width += len(separator)
        out.append(word)
        width += len(word)
    return "".join(out)


def unstructured(name: str, value: str) -> str:
    """A text header (Subject): as is when short, else folded at spaces or encoded."""
    if value.isascii() and "=?" not in value:
        if len(name) + 2 + len(value) <= LINE:
            return value
        words = value.split(" ")
        if max(map(len, words)) <= WORD:
            return _Folded(_fold_words(name, words))
    header = Header(value, "utf-8", header_name=name)
    return _Folded(header.encode(maxlinelen=LINE, linesep=_POLICY.linesep))


@lru_cache(maxsize=4096)
def _mailbox(address: Address) -> tuple[str, ...]:
    """The words of one mailbox: `addr`, `"Name" <addr>`, or encoded words then `<addr>`."""
    name = address.name
    if not name:
        return (address.addr,)
    if name.isascii() and len(name) <= SIMPLE and "=?" not in name:
        return (formataddr((name, address.addr)),)
    return (*_encoded_words(name), f"<{address.addr}>")


def address_list(name: str, addresses: Iterable[Address]) -> str:
    """From, To, Cc, Reply-To: one line when it fits, else folded between words."""
    mailboxes = [_mailbox(a) for a in addresses]
    if all(len(m) == 1 for m in mailboxes):
        value = ", ".join(m[0] for m in mailboxes)
        if len(name) + 2 + len(value) <= LINE:
            return value
    words: list[str] = []
    for mailbox in mailboxes:
        if words:
            words[-1] += ","
        words.extend(mailbox)
    return _Folded(_fold_words(name, words))


def disposition(kind: str, filename: str) -> str:
    """Content-Disposition with the file name; a long or non-ASCII one per RFC 2231."""
    if filename.isascii() and len(filename) <= SIMPLE and "=?" not in filename:
        quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
        return f'{kind}; filename="{quoted}"'
    encoded = quote(filename, safe=_ATTRIBUTE_CHARS)
    chunks: list[str] = []
    while encoded:
        cut = min(len(encoded), WORD - 16)
        # Never split a %XX escape between two sections.
        percent = encoded.rfind("%", max(cut - 2, 0), cut)
        if percent != -1 and cut < len(encoded):
            cut = percent
        chunks.append(encoded[:cut])
        encoded = encoded[cut:]
    if len(chunks) == 1:
        params = [f"filename*=utf-8''{chunks[0]}"]
    else:
        params = [f"filename*0*=utf-8''{chunks[0]}"]
        params += [f"filename*{i}*={chunk}" for i, chunk in enumerate(chunks[1:], 1)]
    return _Folded(f";{_FOLD}".join([kind, *params]))


class _Multipart(Message):
    """A multipart whose boundary is known without parsing its Content-Type back."""

    def __init__(self, subtype: str) -> None:
        super().__init__()
        # 128 random bits cannot turn up in a body by chance, so the generator need not search
        # the parts for a clash (a regular expression compiled per message).
        self.boundary = f"=_{random.getrandbits(128):032x}"
        self["Content-Type"] = f'multipart/{subtype}; boundary="{self.boundary}"'
        self.set_payload([])


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
    del part["MIME-Version"]  # the message's own header only
    part.set_payload(attachment.content)
    encoders.encode_base64(part)
    kind = "inline" if attachment.inline else "attachment"
    part["Content-Disposition"] = disposition(kind, attachment.filename)
    if attachment.inline:
        part["Content-ID"] = f"<{attachment.content_id}>"
    return part


def _body(mail: Mail) -> Message:
    inline = [a for a in mail.attachments if a.inline]
    html: Message | None = None
    if mail.html:
        html = _text_part(mail.html, "html")
        if inline:
            related = _Multipart("related")
            related.attach(html)
            for a in inline:
                related.attach(_file_part(a))
            html = related
    if html is None:
        return _text_part(mail.text, "plain")
    if not mail.text:
        return html
    alternative = _Multipart("alternative")
    alternative.attach(_text_part(mail.text, "plain"))
    alternative.attach(html)
    return alternative


def build_mime(mail: Mail, message_id: str) -> bytes:
    """The message as sent: headers (never Bcc) and parts; every line ends in CRLF."""
    out: list[bytes] = []
    _flatten(message_tree(mail, message_id), out)
    return b"".join(out)


def _flatten(part: Message, out: list[bytes]) -> None:
    """Write `part` as email's BytesGenerator does with our policy, byte for byte (a unit test
    holds them to it), for the parts message_tree builds: their headers are folded and their
    payloads encoded already. The generator's per-part policy copies, re-parsed Content-Type
    headers and line-by-line writes were most of the CPU of building a mail."""
    fold = _POLICY.fold_binary
    out.extend(fold(name, value) for name, value in part.raw_items())
    out.append(b"\r\n")
    if isinstance(part, _Multipart):
        delimiter = b"--" + part.boundary.encode("ascii")
        for i, sub in enumerate(part.get_payload()):
            out.append(delimiter + b"\r\n" if i == 0 else b"\r\n" + delimiter + b"\r\n")
            _flatten(sub, out)
        out.append(b"\r\n" + delimiter + b"--\r\n")
    else:
        payload = part.get_payload()
        assert isinstance(payload, str), "message_tree's leaves hold encoded text"
        out.append(_NEWLINE.sub("\r\n", payload).encode("ascii", "surrogateescape"))


def message_tree(mail: Mail, message_id: str) -> Message:
    """The message as email.message objects, headers folded and payloads encoded."""
    root = _body(mail)
    files = [a for a in mail.attachments if not (a.inline and mail.html)]
    if files:
        mixed = _Multipart("mixed")
        mixed.attach(root)
        for a in files:
            mixed.attach(_file_part(a))
        root = mixed
    if not root.is_multipart():
        payload = root.get_payload()
        if isinstance(payload, str) and not payload.endswith("\n"):
            root.set_payload(payload + "\n")  # the body's last line ends in CRLF too
    root["From"] = address_list("From", (mail.sender,))
    root["To"] = address_list("To", mail.to)
    if mail.cc:
        root["Cc"] = address_list("Cc", mail.cc)
    if mail.reply_to:
        root["Reply-To"] = address_list("Reply-To", (mail.reply_to,))
    root["Subject"] = unstructured("Subject", mail.subject)
    root["Date"] = date_header()
    root["Message-ID"] = message_id
    if "MIME-Version" not in root:
        root["MIME-Version"] = "1.0"
    return root
