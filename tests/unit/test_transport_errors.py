"""Transport failures as our errors: status code, reason, and whether a retry may help."""

from __future__ import annotations

import ssl

import aiohttp
import aiosmtplib
import httpx
import pytest

from mailsvc.addresses import is_host_name, is_loopback_host
from mailsvc.errors import (
    DeliveryUncertain,
    FailedPrecondition,
    MailsvcError,
    RateLimited,
    ResourceExhausted,
    Unavailable,
)
from mailsvc.transports.mailgun import map_http_error, map_status, messages_url
from mailsvc.transports.smtp import SmtpAccount, map_smtp_error, may_send_credentials


def caused(exc: Exception, cause: BaseException) -> Exception:
    exc.__cause__ = cause
    return exc


def refused(*codes: int) -> aiosmtplib.SMTPRecipientsRefused:
    return aiosmtplib.SMTPRecipientsRefused(
        [aiosmtplib.SMTPRecipientRefused(c, "no", f"r{c}@example.com") for c in codes]
    )


# --- SMTP --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "kind", "code", "reason", "transient"),
    [
        (aiosmtplib.SMTPResponseException(451, "later"), Unavailable, "UNAVAILABLE",
         "SMTP_UNAVAILABLE", True),
        (aiosmtplib.SMTPResponseException(550, "no"), FailedPrecondition, "FAILED_PRECONDITION",
         "SMTP_REJECTED", False),
        (aiosmtplib.SMTPResponseException(552, "big"), ResourceExhausted, "RESOURCE_EXHAUSTED",
         "MESSAGE_TOO_LARGE", False),
        (aiosmtplib.SMTPAuthenticationError(535, "bad"), FailedPrecondition,
         "FAILED_PRECONDITION", "SMTP_AUTH_FAILED", False),
        (aiosmtplib.SMTPAuthenticationError(454, "later"), Unavailable, "UNAVAILABLE",
         "SMTP_UNAVAILABLE", True),
        (refused(450, 451), Unavailable, "UNAVAILABLE", "SMTP_UNAVAILABLE", True),
        (refused(450, 550), FailedPrecondition, "FAILED_PRECONDITION", "SMTP_REJECTED", False),
        (aiosmtplib.SMTPConnectError("refused"), Unavailable, "UNAVAILABLE", "SMTP_UNAVAILABLE",
         True),
        (ConnectionRefusedError(), Unavailable, "UNAVAILABLE", "SMTP_UNAVAILABLE", True),
        (aiosmtplib.SMTPNotSupported("no auth"), FailedPrecondition, "FAILED_PRECONDITION",
         "SMTP_NOT_SUPPORTED", False),
        (caused(aiosmtplib.SMTPConnectError("tls"), ssl.SSLCertVerificationError("bad cert")),
         FailedPrecondition, "FAILED_PRECONDITION", "TLS_VERIFY_FAILED", False),
        (caused(aiosmtplib.SMTPConnectError("tls"), ssl.SSLError("handshake")),
         FailedPrecondition, "FAILED_PRECONDITION", "SMTP_TLS_FAILED", False),
    ],
)  # fmt: skip
def test_smtp_errors_before_data(
    exc: Exception, kind: type[MailsvcError], code: str, reason: str, transient: bool
) -> None:
    error = map_smtp_error(exc)
    assert type(error) is kind
    assert (error.code, error.reason, error.transient) == (code, reason, transient)
    assert "no" not in error.message.split() and "later" not in error.message  # not their text


@pytest.mark.parametrize(
    "exc",
    [
        aiosmtplib.SMTPServerDisconnected("gone"),
        aiosmtplib.SMTPReadTimeoutError("slow"),
        ConnectionResetError(),
    ],
)
def test_smtp_connection_lost_during_data_is_uncertain(exc: Exception) -> None:
    error = map_smtp_error(exc, in_data=True)
    assert isinstance(error, DeliveryUncertain)
    assert (error.code, error.reason, error.transient) == (
        "UNAVAILABLE",
        "DELIVERY_UNCERTAIN",
        False,
    )
    assert not isinstance(error, Unavailable)  # nothing that retries Unavailable retries it


def test_smtp_reply_to_data_is_a_verdict_not_an_uncertainty() -> None:
    later = map_smtp_error(aiosmtplib.SMTPDataError(451, "later"), in_data=True)
    assert (later.reason, later.transient) == ("SMTP_UNAVAILABLE", True)
    no = map_smtp_error(aiosmtplib.SMTPDataError(554, "no"), in_data=True)
    assert (no.reason, no.transient) == ("SMTP_REJECTED", False)


def test_transient_is_fixed_per_class() -> None:
    assert Unavailable("x").transient
    assert RateLimited("x").transient
    assert not DeliveryUncertain("x").transient
    assert DeliveryUncertain("x").reason == "DELIVERY_UNCERTAIN"


# --- credentials only over TLS or to this machine -----------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["localhost", "LOCALHOST", "localhost.", "127.0.0.1", "127.1.2.3", "::1", "[::1]",
     "::ffff:127.0.0.1", " 127.0.0.1 "],
)  # fmt: skip
def test_loopback_hosts(host: str) -> None:
    assert is_loopback_host(host)


@pytest.mark.parametrize(
    "host",
    ["smtp.example.com", "vm", "localhost.example.com", "127.0.0.1.nip.io", "10.0.0.1",
     "128.0.0.1", "::2", "0.0.0.0", "", "localhost:25"],
)  # fmt: skip
def test_other_hosts_are_not_loopback(host: str) -> None:
    assert not is_loopback_host(host)


def test_credentials_go_only_over_tls_or_to_loopback() -> None:
    remote = SmtpAccount(host="smtp.example.com", login="u", password="p")
    local = SmtpAccount(host="127.0.0.1", login="u", password="p")
    assert may_send_credentials(remote, tls=True)
    assert not may_send_credentials(remote, tls=False)
    assert may_send_credentials(local, tls=False)


# --- Mailgun -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "reason", "transient"),
    [
        (401, FailedPrecondition, "MAILGUN_AUTH_FAILED", False),
        (403, FailedPrecondition, "MAILGUN_AUTH_FAILED", False),
        (404, FailedPrecondition, "MAILGUN_DOMAIN_NOT_FOUND", False),
        (400, FailedPrecondition, "MAILGUN_REJECTED", False),
        (413, ResourceExhausted, "MESSAGE_TOO_LARGE", False),
        (429, RateLimited, "MAILGUN_RATE_LIMITED", True),
        (500, Unavailable, "MAILGUN_UNAVAILABLE", True),
        (503, Unavailable, "MAILGUN_UNAVAILABLE", True),
    ],
)
def test_mailgun_statuses(
    status: int, kind: type[MailsvcError], reason: str, transient: bool
) -> None:
    error = map_status(status)
    assert type(error) is kind
    assert (error.reason, error.transient) == (reason, transient)


def test_mailgun_connect_failure_is_transient() -> None:
    error = map_http_error(httpx.ConnectError("refused"))
    assert (type(error), error.reason, error.transient) == (
        Unavailable,
        "MAILGUN_UNAVAILABLE",
        True,
    )


def test_mailgun_untrusted_certificate_is_not_unreachable() -> None:
    exc = caused(httpx.ConnectError("tls"), ssl.SSLCertVerificationError("self-signed"))
    error = map_http_error(exc)  # type: ignore[arg-type]
    assert (error.code, error.reason, error.transient) == (
        "FAILED_PRECONDITION",
        "TLS_VERIFY_FAILED",
        False,
    )
    assert "certificate" in error.message


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("closed"),
        caused(httpx.ConnectTimeout("lost"), aiohttp.ServerDisconnectedError()),
    ],
)
def test_mailgun_reply_lost_is_uncertain(exc: httpx.HTTPError) -> None:
    error = map_http_error(exc)
    assert (type(error), error.code, error.reason, error.transient) == (
        DeliveryUncertain,
        "UNAVAILABLE",
        "DELIVERY_UNCERTAIN",
        False,
    )


@pytest.mark.parametrize(
    "domain", ["mg.example.com", "MG.Example.COM", "xn--bcher-kva.example", "bücher.example"]
)
def test_mailgun_domains_that_are_host_names(domain: str) -> None:
    assert is_host_name(domain)
    url = messages_url("https://api.mailgun.net/", domain)
    assert url.startswith("https://api.mailgun.net/v3/") and url.endswith("/messages")
    assert url.count("/") == 5 and "%" not in url


@pytest.mark.parametrize(
    "domain",
    ["../../../other/path?x=", "a/b", "a?b", "a#b", "a%2fb", "a b", "a..b", ".a", "-a.com",
     "a_b.com", "a\n.com", "", "x" * 64 + ".com", "example.com."],
)  # fmt: skip
def test_mailgun_domains_that_would_change_the_path_are_refused(domain: str) -> None:
    assert not is_host_name(domain)
    with pytest.raises(FailedPrecondition) as caught:
        messages_url("https://api.mailgun.net", domain)
    assert caught.value.reason == "MAILGUN_DOMAIN_INVALID"
