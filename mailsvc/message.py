"""The validated mail that every transport sends, and the checks of its attachments.

Addresses and header values are checked in `mailsvc.addresses`; the MIME form is built in
`mailsvc.mime`.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Iterable
from dataclasses import dataclass, field

from mailsvc.addresses import CONTROL_CHARACTERS, Address, has_control, is_mime_type
from mailsvc.errors import FieldViolation, InvalidArgument

MAX_CONTENT_ID = 250  # a Content-ID cannot be folded: keep its header line short


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


def _check_attachment(
    path: str,
    filename: str,
    content_type: str,
    content_id: str,
    violations: list[FieldViolation],
) -> bool:
    ok = True
    if not filename.strip():
        violations.append(FieldViolation(f"{path}.filename", "required"))
        ok = False
    elif has_control(filename):
        violations.append(FieldViolation(f"{path}.filename", CONTROL_CHARACTERS))
        ok = False
    if has_control(content_id) or any(c in content_id for c in "<> "):
        violations.append(
            FieldViolation(
                f"{path}.content_id", "must not contain control characters, spaces, < or >"
            )
        )
        ok = False
    elif len(content_id) > MAX_CONTENT_ID:
        violations.append(
            FieldViolation(f"{path}.content_id", f"at most {MAX_CONTENT_ID} characters")
        )
        ok = False
    if content_type and not is_mime_type(content_type):
        # repr() shows a control character as an escape, never as itself.
        violations.append(
            FieldViolation(
                f"{path}.content_type",
                f"{content_type!r} is not a MIME type (type/subtype, without parameters)",
            )
        )
        ok = False
    return ok


def check_attachments(
    attachments: Iterable[tuple[str, str, bytes, str]], violations: list[FieldViolation]
) -> tuple[Attachment, ...]:
    """Validate (filename, content_type, content, content_id) tuples."""
    out = []
    for i, (filename, content_type, content, content_id) in enumerate(attachments):
        if _check_attachment(f"attachments[{i}]", filename, content_type, content_id, violations):
            mime_type = content_type or (
                mimetypes.guess_type(filename)[0] or "application/octet-stream"
            )
            out.append(Attachment(filename, mime_type.lower(), content, content_id))
    return tuple(out)


def raise_if(violations: list[FieldViolation]) -> None:
    if violations:
        raise InvalidArgument(violations)
