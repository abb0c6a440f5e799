"""DKIM signing end to end: the real server signs what it hands to a real aiosmtpd sink.

The received bytes are checked with dkimpy's own verifier against the TXT record that
`mailsvc.dkim.dns_txt_record` says to publish (a stub resolver stands in for DNS).
"""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable

import dkim
import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from mailsvc.v1 import mail_pb2, settings_pb2

from mailsvc.dkim import dns_txt_record
from tests.conftest import MAILGUN_KEY, MailgunStandIn, Server, SmtpSink, details, smtp_settings
from tests.conftest import SUPERADMIN as SUPERADMIN_MD
from tests.helpers import ServerFactory, SmtpFactory, expect_error, send
from tests.keys import pem

DOMAIN = "example.com"
SELECTOR = "mail2026"
SENDER = "sender@example.com"
COVERED = {
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "mime-version",
    "content-type",
}


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    return {
        "rsa": pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "ed25519": pem(ed25519.Ed25519PrivateKey.generate()),
    }


def dns(pem: str, selector: str = SELECTOR) -> Callable[..., bytes | None]:
    """A resolver answering only the record dns_txt_record says to publish."""
    name, value = dns_txt_record(selector, DOMAIN, pem)

    def lookup(qname: bytes, timeout: float = 5) -> bytes | None:
        return value.encode() if qname.decode().rstrip(".") == name else None

    return lookup


def dkim_settings(pem: str, selector: str = SELECTOR) -> settings_pb2.DkimSettings:
    return settings_pb2.DkimSettings(domain=DOMAIN, selector=selector, private_key=pem)


def start(server_factory: ServerFactory, sink: SmtpSink, pem: str, *args: str) -> Server:
    server = server_factory(*args)
    smtp = smtp_settings(sink)
    smtp.dkim.CopyFrom(dkim_settings(pem))
    server.put_settings(settings_pb2.MailSettings(default_from=SENDER, smtp=smtp))
    return server


def rich_mail() -> mail_pb2.SendMailRequest:
    return mail_pb2.SendMailRequest(
        to=["Bob <bob@example.org>"],
        cc=["carol@example.org"],
        bcc=["dave@example.org"],
        reply_to="help@example.com",
        subject="Grüße, with a long subject " + "x" * 80,
        # a line starting with a dot (SMTP dot-stuffs it) and trailing blank lines
        text="Hello Bob,\n.leading dot\nTabs\tand  spaces  \n\n\n",
        html="<p>Hello <b>Bob</b></p>",
        attachments=[
            mail_pb2.Attachment(
                filename="report.pdf", content_type="application/pdf", content=b"%PDF" * 500
            )
        ],
    )


def signature_tags(raw: bytes) -> dict[str, str]:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    values = msg.get_all("DKIM-Signature") or []
    assert len(values) == 1, f"{len(values)} DKIM-Signature headers"
    flat = "".join(str(values[0]).split())
    return dict(tag.split("=", 1) for tag in flat.split(";") if tag)


@pytest.mark.parametrize(
    ("kind", "algorithm"), [("rsa", "rsa-sha256"), ("ed25519", "ed25519-sha256")]
)
def test_every_smtp_mail_carries_one_verifying_signature(
    server_factory: ServerFactory,
    smtp_factory: SmtpFactory,
    keys: dict[str, str],
    kind: str,
    algorithm: str,
) -> None:
    sink = smtp_factory()
    server = start(server_factory, sink, keys[kind])
    send(server, rich_mail())
    send(server, to=["eve@example.org"], subject="plain", text="short")
    received = sink.wait_for(2)
    assert len(received) == 2
    for mail in received:
        raw = mail.raw
        tags = signature_tags(raw)
        assert (tags["a"], tags["c"], tags["d"], tags["s"]) == (
            algorithm,
            "relaxed/relaxed",
            DOMAIN,
            SELECTOR,
        )
        present = {name.lower() for name in mail.message} - {"dkim-signature"}
        signed = set(tags["h"].lower().split(":"))
        assert COVERED & present <= signed, COVERED & present - signed
        assert dkim.verify(raw, dnsfunc=dns(keys[kind])), f"{kind} signature does not verify"
        # what the signature covers cannot be changed unnoticed
        tampered = raw.replace(b"Subject: ", b"Subject: Re: ", 1)
        assert tampered != raw and not dkim.verify(tampered, dnsfunc=dns(keys[kind]))
    # the rich mail's headers are all covered
    rich = next(m for m in received if m.message["Cc"])
    assert {"from", "to", "cc", "reply-to", "subject"} <= set(
        signature_tags(rich.raw)["h"].split(":")
    )


def test_a_new_key_is_used_from_the_next_mail_on(
    server_factory: ServerFactory, smtp_factory: SmtpFactory, keys: dict[str, str]
) -> None:
    sink = smtp_factory()
    server = start(server_factory, sink, keys["rsa"])
    send(server, to=["bob@example.org"], subject="one", text="1")
    request = settings_pb2.UpdateMailSettingsRequest(
        settings=settings_pb2.MailSettings(
            smtp=settings_pb2.SmtpSettings(dkim=dkim_settings(keys["ed25519"], "mail2027"))
        )
    )
    request.update_mask.paths.append("smtp.dkim")
    reply = server.settings.UpdateMailSettings(request, metadata=SUPERADMIN_MD, timeout=10)
    assert reply.smtp.dkim.private_key == "" and reply.smtp.dkim.private_key_set
    send(server, to=["bob@example.org"], subject="two", text="2")
    first, second = sink.wait_for(2)
    assert dkim.verify(first.raw, dnsfunc=dns(keys["rsa"]))
    assert signature_tags(second.raw)["s"] == "mail2027"
    assert dkim.verify(second.raw, dnsfunc=dns(keys["ed25519"], "mail2027"))
    # removing smtp.dkim stops the signing
    request = settings_pb2.UpdateMailSettingsRequest(settings=settings_pb2.MailSettings())
    request.update_mask.paths.append("smtp.dkim")
    server.settings.UpdateMailSettings(request, metadata=SUPERADMIN_MD, timeout=10)
    send(server, to=["bob@example.org"], subject="three", text="3")
    third = sink.wait_for(3)[2]
    assert "DKIM-Signature" not in third.message


def test_mail_over_mailgun_is_not_signed(
    server_factory: ServerFactory,
    smtp_factory: SmtpFactory,
    mailgun: MailgunStandIn,
    keys: dict[str, str],
) -> None:
    # SMTP with DKIM is configured but refuses every mail for a while: the mail fails over to
    # Mailgun, which signs on its own; nothing of ours is passed to it.
    sink = smtp_factory()
    sink.handler.always = "451 try later"
    server = server_factory("--mailgun-base-url", mailgun.base_url, "--send-attempts", "1")
    smtp = smtp_settings(sink)
    smtp.dkim.CopyFrom(dkim_settings(keys["rsa"]))
    server.put_settings(
        settings_pb2.MailSettings(
            default_from=SENDER,
            smtp=smtp,
            mailgun=settings_pb2.MailgunSettings(domain="mg.example.com", key=MAILGUN_KEY),
        )
    )
    reply = send(server, to=["bob@example.org"], subject="via mailgun", text="hi")
    assert reply.transport == "mailgun"
    [request] = mailgun.requests
    names = {name.lower() for name, _ in request.fields}
    assert not any("dkim" in name for name in names), names
    assert all("DKIM" not in value for _, value in request.fields)


def test_a_bad_key_is_refused_at_write_time_without_echo(
    server_factory: ServerFactory, smtp_factory: SmtpFactory, keys: dict[str, str]
) -> None:
    sink = smtp_factory()
    server = start(server_factory, sink, keys["rsa"])
    before = server.settings.GetMailSettings(
        settings_pb2.GetMailSettingsRequest(), metadata=SUPERADMIN_MD, timeout=10
    )
    # a public key where the private one belongs, and a truncated private key
    public = (
        serialization.load_pem_private_key(keys["rsa"].encode(), None)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    truncated = "\n".join([*keys["rsa"].splitlines()[:8], "-----END PRIVATE KEY-----"])
    for bad in (public, truncated):
        smtp = smtp_settings(sink)
        smtp.dkim.CopyFrom(dkim_settings(bad))
        request = settings_pb2.UpdateMailSettingsRequest(
            settings=settings_pb2.MailSettings(default_from=SENDER, smtp=smtp)
        )
        err = expect_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            server.settings.UpdateMailSettings,
            request,
            metadata=SUPERADMIN_MD,
            timeout=10,
        )
        violations = details(err)["violations"]
        assert set(violations) == {"settings.smtp.dkim.private_key"}
        shown = (err.details() or "") + " ".join(violations.values()) + server.logs()
        for line in bad.splitlines()[1:-1]:
            assert line not in shown
    after = server.settings.GetMailSettings(
        settings_pb2.GetMailSettingsRequest(), metadata=SUPERADMIN_MD, timeout=10
    )
    assert after.etag == before.etag
    # the stored key still signs
    send(server, to=["bob@example.org"], subject="still signed", text="hi")
    assert dkim.verify(sink.wait_for(1)[0].raw, dnsfunc=dns(keys["rsa"]))
