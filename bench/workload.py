"""What the benchmark sends: the caller's token, the settings, the mail and the template."""

from __future__ import annotations

import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from urllib.parse import urlencode

import jwt
from google.protobuf import struct_pb2
from mailsvc.v1 import mail_pb2, settings_pb2

JWT_SECRET = "bench-jwt-secret-0123456789abcdef0123456789"
SENDER = "bench@example.com"
RECIPIENT = "rcpt@example.com"
MAILGUN_DOMAIN = "bench.example.com"
MAILGUN_KEY = "key-bench-0123456789"
TEMPLATE_NAME = "bench-welcome"

_LINE = "The quick brown fox jumps over the lazy dog while the benchmark counts mail.\n"
TEXT = (_LINE * (1024 // len(_LINE) + 1))[:1023] + "\n"  # 1 KiB of plain text
HTML = "<p>Hello <b>bench</b>: this is the <i>small</i> html part.</p>"
PLAIN_SUBJECT = "bench plain mail"
QUEUED_SUBJECT = "bench queued mail"  # SendMail queue=true while the workers deliver
BACKLOG_SUBJECT = "bench backlog mail"  # SendMail queue=true while the sink holds them

# Records seeded for ListMessages: spread over this many recipients, rcpt<n>@example.com.
RECORD_RECIPIENTS = 100
LIST_PAGE = 50

TEMPLATE_PARAMS: dict[str, str | int] = {"name": "Alice", "count": 3}
TEMPLATED_SUBJECT = "Welcome Alice, 3 new"


def token(roles: list[str], sub: str = "bench") -> str:
    """A bearer token the server (started with MAILSVC_JWT_SECRET=JWT_SECRET) accepts."""
    return jwt.encode(
        {"sub": sub, "roles": roles, "exp": int(time.time()) + 3600}, JWT_SECRET, "HS256"
    )


def template() -> settings_pb2.MailTemplate:
    """A template with a small typed model whose rendered mail is the size of the plain one."""
    return settings_pb2.MailTemplate(
        to=[RECIPIENT],
        subject="Welcome {{ name }}, {{ count }} new",
        text="Hi {{ name }}, you have {{ count }} new messages.\n" + TEXT,
        html="<p>Hi {{ name }}</p><p>You have <b>{{ count }}</b> new messages.</p>",
        model={"name": "string", "count": "integer"},
    )


def smtp_settings(host: str, port: int) -> settings_pb2.MailSettings:
    """SMTP to the sink, plus the template, and nothing else."""
    return settings_pb2.MailSettings(
        default_from=SENDER,
        smtp=settings_pb2.SmtpSettings(host=host, port=port),
        templates={TEMPLATE_NAME: template()},
    )


def mailgun_settings() -> settings_pb2.MailSettings:
    """Mailgun only (its base URL is a server flag pointing at the stand-in)."""
    return settings_pb2.MailSettings(
        default_from=SENDER,
        mailgun=settings_pb2.MailgunSettings(domain=MAILGUN_DOMAIN, key=MAILGUN_KEY),
    )


def send_mail_request(
    *, queue: bool = False, subject: str = PLAIN_SUBJECT
) -> mail_pb2.SendMailRequest:
    return mail_pb2.SendMailRequest(
        to=[RECIPIENT], subject=subject, text=TEXT, html=HTML, queue=queue
    )


def record_recipient(n: int) -> str:
    return f"rcpt{n % RECORD_RECIPIENTS}@example.com"


def list_request(n: int) -> mail_pb2.ListMessagesRequest:
    """The first page of one recipient's records (the n-th recipient, cycling)."""
    return mail_pb2.ListMessagesRequest(page_size=LIST_PAGE, recipient=record_recipient(n))


def templated_request() -> mail_pb2.SendTemplatedMailRequest:
    parameters = struct_pb2.Struct()
    parameters.update(TEMPLATE_PARAMS)
    return mail_pb2.SendTemplatedMailRequest(template_name=TEMPLATE_NAME, parameters=parameters)


def raw_mime() -> bytes:
    """The plain mail as MIME bytes, for driving the SMTP sink directly."""
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = RECIPIENT
    msg["Subject"] = "bench direct mail"
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain="example.com")
    msg.set_content(TEXT)
    msg.add_alternative(HTML, subtype="html")
    return msg.as_bytes()


def mailgun_form() -> bytes:
    """The plain mail as Mailgun's urlencoded form, for driving the stand-in directly."""
    fields = {"from": SENDER, "to": RECIPIENT, "subject": PLAIN_SUBJECT, "text": TEXT}
    return urlencode({**fields, "html": HTML}).encode()
