"""Composing a mail from a request or a template: every field validated, nothing sent."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import parseaddr
from functools import lru_cache
from typing import Any

from mailsvc.addresses import Address, check_header_text, parse_address, parse_addresses
from mailsvc.auth import Principal, require_template
from mailsvc.config import Config
from mailsvc.errors import FieldViolation, NotFound
from mailsvc.message import Mail, check_attachments, raise_if
from mailsvc.store import Snapshot
from mailsvc.templates import CompiledTemplate
from mailsvc.v1.settings_pb2 import MailSettings


@dataclass(frozen=True, kw_only=True)
class MailRequest:
    """What a caller asked for, before validation (the From is never the caller's)."""

    to: Sequence[str]
    cc: Sequence[str] = ()
    bcc: Sequence[str] = ()
    subject: str = ""
    text: str = ""
    html: str = ""
    reply_to: str = ""
    attachments: Sequence[tuple[str, str, bytes, str]] = ()
    sender: Address | str = ""


def sender_of(settings: MailSettings, config: Config) -> Address:
    """The From the operator configured: the settings' default_from, else the server's."""
    return _configured_sender(settings.default_from or config.default_from)


@lru_cache(maxsize=64)
def _configured_sender(value: str) -> Address:
    name, addr = parseaddr(value)
    return Address(name, addr or value)


MAX_RECIPIENTS = 1000  # to, cc and bcc together
MAX_ATTACHMENTS = 100


def _check_counts(request: MailRequest) -> None:
    """Refuse oversized lists before any of their items is parsed."""
    v: list[FieldViolation] = []
    count = len(request.to) + len(request.cc) + len(request.bcc)
    if count > MAX_RECIPIENTS:
        v.append(
            FieldViolation("to", f"{count} recipients in to, cc and bcc; at most {MAX_RECIPIENTS}")
        )
    if len(request.attachments) > MAX_ATTACHMENTS:
        v.append(
            FieldViolation(
                "attachments", f"{len(request.attachments)} attachments; at most {MAX_ATTACHMENTS}"
            )
        )
    raise_if(v)


def check_mail(request: MailRequest) -> Mail:
    """Validate every field; all bad fields are reported together, nothing is sent."""
    _check_counts(request)
    v: list[FieldViolation] = []
    to = parse_addresses(request.to, "to", v)
    cc = parse_addresses(request.cc, "cc", v)
    bcc = parse_addresses(request.bcc, "bcc", v)
    if not request.to:
        v.append(FieldViolation("to", "at least one recipient is required"))
    check_header_text(request.subject, "subject", v)
    if not request.text and not request.html:
        v.append(FieldViolation("text", "at least one of text and html is required"))
    reply_to: Address | None = None
    if request.reply_to:
        reply_to = parse_address(request.reply_to, "reply_to", v)
    attachments = check_attachments(request.attachments, v)
    sender = (
        parse_address(request.sender, "from_address", v)
        if isinstance(request.sender, str)
        else request.sender
    )
    raise_if(v)
    assert sender is not None
    return Mail(
        sender=sender,
        to=to,
        cc=cc,
        bcc=bcc,
        subject=request.subject,
        text=request.text,
        html=request.html,
        reply_to=reply_to,
        attachments=attachments,
    )


def template_for(snapshot: Snapshot, name: str, principal: Principal) -> CompiledTemplate:
    """The compiled template, if it exists and the caller may use it."""
    template = snapshot.templates.get(name)
    if template is None:
        raise NotFound(f"no template named {name!r}", reason="TEMPLATE_NOT_FOUND")
    require_template(principal, name, template.roles)
    return template


async def compose_templated(
    snapshot: Snapshot,
    config: Config,
    template: CompiledTemplate,
    parameters: Mapping[str, Any],
    *,
    to: Sequence[str] = (),
    cc: Sequence[str] = (),
    bcc: Sequence[str] = (),
) -> Mail:
    """Render the template and validate the result like a SendMail request."""
    rendered = await template.render_async(parameters)
    sender: Address | str = rendered.from_address or sender_of(snapshot.settings, config)
    return check_mail(
        MailRequest(
            to=[*rendered.to, *to],
            cc=[*rendered.cc, *cc],
            bcc=[*rendered.bcc, *bcc],
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            sender=sender,
        )
    )
