"""DKIM signing: signatures verified by dkimpy against the TXT record we tell users to publish."""

from __future__ import annotations

import re
from collections.abc import Callable
from email.message import EmailMessage
from email.policy import SMTP

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mailsvc.addresses import Address
from mailsvc.dkim import DkimKeyError, DkimSigner, dns_txt_record, validate_private_key
from mailsvc.message import Attachment, Mail
from mailsvc.mime import build_mime
from tests.keys import pem as _pem
from tests.keys import rsa_511_bits

DOMAIN = "example.com"
SELECTOR = "mail2026"


def _mail() -> bytes:
    msg = EmailMessage()
    msg["From"] = "Alice Sender <alice@example.com>"
    msg["To"] = "Bob <bob@example.org>, carol@example.net"
    msg["Cc"] = "dave@example.org"
    msg["Reply-To"] = "replies@example.com"
    msg["Subject"] = "Quarterly report, with a subject long enough to be folded by the generator"
    msg["Date"] = "Tue, 24 Nov 2026 12:00:00 +0000"
    msg["Message-ID"] = "<abc123@example.com>"
    msg["X-Mailer"] = "mailsvc"
    msg.set_content("Hello Bob,\n\nthe numbers are in.   Trailing spaces here:   \n\n\n")
    msg.add_alternative("<p>Hello Bob,</p><p>the numbers are in.</p>", subtype="html")
    msg.add_attachment(
        b"\x00\x01binary" * 50, maintype="application", subtype="octet-stream", filename="r.bin"
    )
    return msg.as_bytes(policy=SMTP)


def _dns(pem: str) -> Callable[..., bytes | None]:
    name, value = dns_txt_record(SELECTOR, DOMAIN, pem)

    def lookup(qname: bytes, timeout: float = 5) -> bytes | None:
        return value.encode() if qname.decode().rstrip(".") == name else None

    return lookup


def _tags(signed: bytes) -> dict[str, str]:
    header = signed.split(b"\r\n\r\n", 1)[0].decode()
    sig = re.search(r"^DKIM-Signature:(.*?)\r\n(?=\S)", header, re.S | re.M)
    assert sig is not None
    value = re.sub(r"\s+", "", sig.group(1))
    return dict(t.split("=", 1) for t in value.split(";") if t)


@pytest.mark.parametrize(
    ("key_name", "algorithm", "k_tag"),
    [("rsa_pem", "rsa-sha256", "rsa"), ("ed25519_pem", "ed25519-sha256", "ed25519")],
)
def test_signature_verifies_against_published_record(
    request: pytest.FixtureRequest, key_name: str, algorithm: str, k_tag: str
) -> None:
    pem: str = request.getfixturevalue(key_name)
    raw = _mail()
    signed = DkimSigner.from_settings(DOMAIN, SELECTOR, pem).sign(raw)

    assert signed.endswith(raw)
    assert signed.count(b"DKIM-Signature:") == 1
    assert dkim.verify(signed, dnsfunc=_dns(pem))
    tags = _tags(signed)
    assert tags["a"] == algorithm
    assert tags["c"] == "relaxed/relaxed"
    assert (tags["d"], tags["s"]) == (DOMAIN, SELECTOR)
    assert tags["h"].split(":") == [
        "from",
        "to",
        "cc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "from",
    ]
    name, value = dns_txt_record(SELECTOR, DOMAIN, pem)
    assert name == f"{SELECTOR}._domainkey.{DOMAIN}"
    assert value.startswith(f"v=DKIM1; k={k_tag}; p=")


def test_headers_signed_only_where_present(rsa_pem: str) -> None:
    msg = EmailMessage()
    msg["From"] = "alice@example.com"
    msg["To"] = "bob@example.org"
    msg["Subject"] = "plain"
    msg.set_content("hi")
    signed = DkimSigner.from_settings(DOMAIN, SELECTOR, rsa_pem).sign(msg.as_bytes(policy=SMTP))
    assert dkim.verify(signed, dnsfunc=_dns(rsa_pem))
    assert _tags(signed)["h"].split(":") == [
        "from",
        "to",
        "subject",
        "content-type",
        "mime-version",
        "from",
    ]


@pytest.mark.parametrize("key_name", ["rsa_pem", "ed25519_pem"])
@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"the numbers are in.", b"the numbers are out"),  # body
        (b" Quarterly report", b" Monthly report"),  # a signed, folded header
        (b"To: Bob", b"To: Eve <eve@example.org>, Bob"),
    ],
)
def test_tampered_mail_fails_verification(
    request: pytest.FixtureRequest, key_name: str, old: bytes, new: bytes
) -> None:
    pem: str = request.getfixturevalue(key_name)
    signed = DkimSigner.from_settings(DOMAIN, SELECTOR, pem).sign(_mail())
    assert old in signed
    assert not dkim.verify(signed.replace(old, new, 1), dnsfunc=_dns(pem))


def test_second_from_added_later_breaks_signature(ed25519_pem: str) -> None:
    signed = DkimSigner.from_settings(DOMAIN, SELECTOR, ed25519_pem).sign(_mail())
    head, body = signed.split(b"\r\n\r\n", 1)
    forged = head + b"\r\nFrom: mallory@example.com\r\n\r\n" + body
    assert not dkim.verify(forged, dnsfunc=_dns(ed25519_pem))


def test_unsigned_header_may_be_added(rsa_pem: str) -> None:
    signed = DkimSigner.from_settings(DOMAIN, SELECTOR, rsa_pem).sign(_mail())
    relayed = b"Received: from relay by mx; Tue, 24 Nov 2026 12:00:01 +0000\r\n" + signed
    assert dkim.verify(relayed, dnsfunc=_dns(rsa_pem))


def test_lf_line_endings_and_pkcs1_1024_bit_key() -> None:
    pem = _pem(
        rsa.generate_private_key(public_exponent=65537, key_size=1024),
        serialization.PrivateFormat.TraditionalOpenSSL,
    )
    assert pem.startswith("-----BEGIN RSA PRIVATE KEY-----")
    raw = _mail().replace(b"\r\n", b"\n")
    signed = DkimSigner.from_settings(DOMAIN, SELECTOR, pem).sign(raw)
    assert b"\r\n" not in signed
    assert dkim.verify(signed, dnsfunc=_dns(pem))


def test_wrong_published_key_fails(rsa_pem: str) -> None:
    other = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    signed = DkimSigner.from_settings(DOMAIN, SELECTOR, rsa_pem).sign(_mail())
    assert not dkim.verify(signed, dnsfunc=_dns(other))


def _bad_keys() -> list[tuple[str, str, str]]:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    good = _pem(rsa_key)
    public = (
        rsa_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    encrypted = _pem(rsa_key, password=b"pw")
    lines = good.splitlines()
    truncated = "\n".join(lines[: len(lines) // 2] + lines[-1:])
    return [
        ("empty", "", "no private key"),
        ("garbage", "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC-not-a-key", "not a PEM private key"),
        ("truncated", truncated, "not a PEM private key"),
        ("public key", public, "not a PEM private key"),
        ("encrypted", encrypted, "passphrase"),
        ("rsa 511 bits", rsa_511_bits(), "511 bits; at least 1024"),
        ("ec p-256", _pem(ec.generate_private_key(ec.SECP256R1())), "unsupported key type"),
    ]


@pytest.mark.parametrize(("label", "pem", "problem"), _bad_keys(), ids=lambda v: str(v)[:12])
def test_bad_keys_refused_without_echo(label: str, pem: str, problem: str) -> None:
    found = validate_private_key(pem)
    assert found is not None and problem in found, label
    with pytest.raises(DkimKeyError) as info:
        DkimSigner.from_settings(DOMAIN, SELECTOR, pem)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == found
    # neither the message nor a chained library error may carry any of the key's text
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    for line in pem.splitlines():
        if len(line) > 8 and not line.startswith("-----"):
            assert line not in found
    with pytest.raises(DkimKeyError):
        dns_txt_record(SELECTOR, DOMAIN, pem)


def test_good_keys_validate(rsa_pem: str, ed25519_pem: str) -> None:
    assert validate_private_key(rsa_pem) is None
    assert validate_private_key(ed25519_pem.encode()) is None


@pytest.mark.parametrize(
    ("domain", "selector"), [("", "s"), ("example.com", ""), ("exämple.com", "s")]
)
def test_domain_and_selector_required_ascii(rsa_pem: str, domain: str, selector: str) -> None:
    with pytest.raises(DkimKeyError):
        DkimSigner.from_settings(domain, selector, rsa_pem)


def test_mail_as_the_service_builds_it(ed25519_pem: str, rsa_pem: str) -> None:
    mail = Mail(
        sender=Address("Ünïcode Sender", "noreply@example.com"),
        to=(Address("Bob", "bob@example.org"),),
        cc=(Address("", "carol@example.net"),),
        bcc=(Address("", "hidden@example.net"),),
        reply_to=Address("", "help@example.com"),
        subject="Grüße, a non-ASCII subject",
        text="Hello\n" * 200,
        html="<p>Hello</p>",
        attachments=(Attachment("a.txt", "text/plain", b"file body"),),
    )
    raw = build_mime(mail, "<x1@example.com>")
    for pem in (rsa_pem, ed25519_pem):
        signed = DkimSigner.from_settings(DOMAIN, SELECTOR, pem).sign(raw)
        assert dkim.verify(signed, dnsfunc=_dns(pem))
        assert "bcc" not in _tags(signed)["h"].split(":")
