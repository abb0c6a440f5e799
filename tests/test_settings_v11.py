"""v1.1 settings over the real server: smtp.dkim, mailgun.webhook_signing_key, rate_limits.

Secrets (the DKIM private key, the webhook signing key) are never returned and never logged;
bad values are refused with INVALID_ARGUMENT naming the field, and nothing is written.
"""

from __future__ import annotations

import grpc
from cryptography.hazmat.primitives.asymmetric import ed25519
from mailsvc.v1 import settings_pb2

from tests.conftest import MAILGUN_KEY, SUPERADMIN, Server, details
from tests.helpers import expect_error
from tests.helpers import get_settings as get
from tests.keys import pem, rsa_511_bits

SIGNING_KEY = "whsec-Sig-N1ng-K3y-0123456789"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def body_of(key_pem: str) -> str:
    """The first base64 line of a PEM: what a leak of the key would show."""
    return key_pem.splitlines()[1]


def update(
    server: Server, settings: settings_pb2.MailSettings, *paths: str
) -> settings_pb2.MailSettings:
    request = settings_pb2.UpdateMailSettingsRequest(settings=settings)
    request.update_mask.paths.extend(paths)
    reply: settings_pb2.MailSettings = server.settings.UpdateMailSettings(
        request, metadata=SUPERADMIN, timeout=10
    )
    return reply


def full(key_pem: str = "", *, signing_key: str = SIGNING_KEY) -> settings_pb2.MailSettings:
    return settings_pb2.MailSettings(
        smtp=settings_pb2.SmtpSettings(
            host="127.0.0.1",
            port=2525,
            dkim=settings_pb2.DkimSettings(
                domain="example.com", selector="mail2026", private_key=key_pem
            ),
        ),
        mailgun=settings_pb2.MailgunSettings(
            domain="mg.example.com", key=MAILGUN_KEY, webhook_signing_key=signing_key
        ),
        rate_limits=[
            settings_pb2.RateLimit(role="user", per_minute=10, per_day=500),
            settings_pb2.RateLimit(role="bulk", per_minute=600),
        ],
    )


def refused(server: Server, settings: settings_pb2.MailSettings, *paths: str) -> dict[str, str]:
    """The update fails INVALID_ARGUMENT and writes nothing; returns the field violations."""
    before = get(server).etag
    err = expect_error(INVALID, update, server, settings, *paths)
    assert get(server).etag == before
    violations: dict[str, str] = details(err)["violations"]
    for secret in (settings.smtp.dkim.private_key, settings.mailgun.webhook_signing_key):
        for line in secret.splitlines()[1:-1] or [secret]:
            if line:
                assert line not in (err.details() or ""), "a secret in the message"
                assert all(line not in d for d in violations.values()), "a secret in details"
    return violations


def assert_hidden(settings: settings_pb2.MailSettings, *, dkim: bool, webhook: bool) -> None:
    assert settings.smtp.dkim.private_key == ""
    assert settings.smtp.dkim.private_key_set is dkim
    assert settings.mailgun.webhook_signing_key == ""
    assert settings.mailgun.webhook_signing_key_set is webhook


def test_round_trip_hides_the_secrets(server: Server, rsa_pem: str) -> None:
    reply = update(server, full(rsa_pem))
    assert_hidden(reply, dkim=True, webhook=True)
    stored = get(server)
    assert_hidden(stored, dkim=True, webhook=True)
    assert (stored.smtp.dkim.domain, stored.smtp.dkim.selector) == ("example.com", "mail2026")
    assert [(r.role, r.per_minute, r.per_day) for r in stored.rate_limits] == [
        ("user", 10, 500),
        ("bulk", 600, 0),
    ]
    # The settings file keeps them (like the SMTP password), readable by our user only.
    text = (server.data_dir / "settings.json").read_text()
    assert body_of(rsa_pem) in text and SIGNING_KEY in text


def test_full_replace_without_secrets_keeps_them(server: Server, rsa_pem: str) -> None:
    update(server, full(rsa_pem))
    again = full("", signing_key="")
    again.smtp.dkim.selector = "mail2027"
    reply = update(server, again)
    assert_hidden(reply, dkim=True, webhook=True)
    assert reply.smtp.dkim.selector == "mail2027"
    # a full replace dropping the parents drops the secrets with them
    reply = update(server, settings_pb2.MailSettings(smtp=settings_pb2.SmtpSettings(host="h")))
    assert not reply.HasField("mailgun") and not reply.smtp.HasField("dkim")


def test_masks_name_the_new_fields(server: Server, rsa_pem: str, ed25519_pem: str) -> None:
    update(server, full(rsa_pem))
    # smtp.dkim without a key: the stored one stays
    changed = settings_pb2.MailSettings(
        smtp=settings_pb2.SmtpSettings(
            dkim=settings_pb2.DkimSettings(domain="example.org", selector="s1")
        )
    )
    reply = update(server, changed, "smtp.dkim")
    assert reply.smtp.dkim.domain == "example.org" and reply.smtp.dkim.private_key_set
    assert reply.smtp.host == "127.0.0.1"
    # smtp.dkim.private_key: a new key replaces it; an empty one clears it, which leaves a
    # DKIM setting without a key: refused
    new_key = settings_pb2.MailSettings(
        smtp=settings_pb2.SmtpSettings(dkim=settings_pb2.DkimSettings(private_key=ed25519_pem))
    )
    assert update(server, new_key, "smtp.dkim.private_key").smtp.dkim.private_key_set
    violations = refused(server, settings_pb2.MailSettings(), "smtp.dkim.private_key")
    assert "settings.smtp.dkim.private_key" in violations
    # smtp.dkim with nothing: DKIM off
    reply = update(server, settings_pb2.MailSettings(), "smtp.dkim")
    assert not reply.smtp.HasField("dkim") and reply.smtp.host == "127.0.0.1"
    # mailgun.webhook_signing_key: set, then cleared by naming it with an empty value
    key_only = settings_pb2.MailSettings(
        mailgun=settings_pb2.MailgunSettings(webhook_signing_key="other-key")
    )
    assert update(server, key_only, "mailgun.webhook_signing_key").mailgun.webhook_signing_key_set
    reply = update(server, settings_pb2.MailSettings(), "mailgun.webhook_signing_key")
    assert not reply.mailgun.webhook_signing_key_set and reply.mailgun.key_set
    # rate_limits: the list is replaced as a whole
    limits = settings_pb2.MailSettings(rate_limits=[settings_pb2.RateLimit(role="ops", per_day=5)])
    reply = update(server, limits, "rate_limits")
    assert [(r.role, r.per_day) for r in reply.rate_limits] == [("ops", 5)]
    assert [
        r.role for r in update(server, settings_pb2.MailSettings(), "rateLimits").rate_limits
    ] == []
    # output-only flags in a mask are ignored, as for password_set
    reply = update(server, settings_pb2.MailSettings(), "smtp.dkim.private_key_set")
    assert reply.smtp.host == "127.0.0.1"


def _dkim(**fields: str) -> settings_pb2.MailSettings:
    dkim = settings_pb2.DkimSettings(
        domain=fields.get("domain", ""),
        selector=fields.get("selector", ""),
        private_key=fields.get("private_key", ""),
    )
    return settings_pb2.MailSettings(smtp=settings_pb2.SmtpSettings(host="127.0.0.1", dkim=dkim))


def test_dkim_validation(server: Server, rsa_pem: str) -> None:
    bad_pem = "-----BEGIN PRIVATE KEY-----\nTOPSECRETnotakey0123456789\n-----END PRIVATE KEY-----\n"
    small = rsa_511_bits()
    locked = pem(ed25519.Ed25519PrivateKey.generate(), password=b"pass-phrase")
    cases: list[tuple[dict[str, str], str, str]] = [
        ({"domain": "example.com", "selector": "s1", "private_key": bad_pem}, "private_key", "PEM"),
        ({"domain": "example.com", "selector": "s1", "private_key": small}, "private_key", "511"),
        ({"domain": "example.com", "selector": "s1", "private_key": locked}, "private_key", "pass"),
        ({"domain": "example.com", "selector": "s1"}, "private_key", "required"),
        ({"selector": "s1", "private_key": rsa_pem}, "domain", "required"),
        ({"domain": "example.com", "private_key": rsa_pem}, "selector", "required"),
        ({"domain": "exa mple.com", "selector": "s1", "private_key": rsa_pem}, "domain", "DNS"),
        ({"domain": "example.com", "selector": "s1;x=y", "private_key": rsa_pem}, "selector", ""),
        ({"domain": "bücher.de", "selector": "s1", "private_key": rsa_pem}, "domain", "xn--"),
    ]
    for fields, field, words in cases:
        violations = refused(server, _dkim(**fields))
        path = f"settings.smtp.dkim.{field}"
        assert path in violations, (fields.keys(), violations)
        assert words in violations[path]
    assert "TOPSECRET" not in server.logs()


def test_rate_limit_validation(server: Server) -> None:
    rules = [
        settings_pb2.RateLimit(role="user", per_minute=-1),
        settings_pb2.RateLimit(role=" ", per_day=3),
        settings_pb2.RateLimit(role="bulk", per_day=-5),
        settings_pb2.RateLimit(role="big", per_minute=2_000_000_000),
    ]
    violations = refused(server, settings_pb2.MailSettings(rate_limits=rules))
    assert set(violations) == {
        "settings.rate_limits[0].per_minute",
        "settings.rate_limits[1].role",
        "settings.rate_limits[2].per_day",
        "settings.rate_limits[3].per_minute",
    }
    # through a mask the paths are the same
    masked = refused(server, settings_pb2.MailSettings(rate_limits=rules[:1]), "rate_limits")
    assert set(masked) == {"settings.rate_limits[0].per_minute"}


def test_secrets_never_reach_the_log(server: Server, rsa_pem: str, ed25519_pem: str) -> None:
    update(server, full(rsa_pem))
    update(server, full(ed25519_pem, signing_key=SIGNING_KEY + "-2"))
    refused(server, full("-----BEGIN PRIVATE KEY-----\nLEAKME\n-----END PRIVATE KEY-----"))
    get(server)
    server.stop()
    log = server.logs()
    for secret in (body_of(rsa_pem), body_of(ed25519_pem), SIGNING_KEY, "LEAKME", MAILGUN_KEY):
        assert secret not in log
