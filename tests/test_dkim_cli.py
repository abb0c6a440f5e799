"""`mailsvc dkim-record`: the DNS record for a key made with openssl, as the docs tell."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization

from mailsvc.dkim import DkimSigner
from tests.helpers import cli

DOMAIN = "example.com"
SELECTOR = "mail2026"

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")


def genpkey(path: Path, *algorithm: str) -> Path:
    subprocess.run(
        ["openssl", "genpkey", *algorithm, "-out", str(path)], check=True, capture_output=True
    )
    return path


def record(key_file: Path) -> tuple[str, str]:
    result = cli(
        "dkim-record", "--domain", DOMAIN, "--selector", SELECTOR, "--key-file", str(key_file)
    )
    assert result.returncode == 0, result.stderr
    name, value = result.stdout.splitlines()
    return name, value


def mail() -> bytes:
    return (
        b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n"
        b"Date: Tue, 24 Nov 2026 12:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\r\nhello\r\n"
    )


@needs_openssl
@pytest.mark.parametrize(
    ("algorithm", "k_tag"),
    [
        (("-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"), "rsa"),
        (("-algorithm", "ed25519"), "ed25519"),
    ],
)
def test_prints_the_record_that_verifies(
    tmp_path: Path, algorithm: tuple[str, ...], k_tag: str
) -> None:
    key_file = genpkey(tmp_path / "dkim.pem", *algorithm)
    name, value = record(key_file)
    assert name == f"{SELECTOR}._domainkey.{DOMAIN}"
    tags = dict(part.strip().split("=", 1) for part in value.split(";"))
    assert (tags["v"], tags["k"]) == ("DKIM1", k_tag)
    # p= is the public half, independently derived
    private = serialization.load_pem_private_key(key_file.read_bytes(), None)
    if k_tag == "rsa":
        public = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    assert base64.b64decode(tags["p"]) == public
    # a mail signed with that key verifies against the printed record
    signed = DkimSigner.from_settings(DOMAIN, SELECTOR, key_file.read_bytes()).sign(mail())

    def dns(qname: bytes, timeout: float = 5) -> bytes | None:
        return value.encode() if qname.decode().rstrip(".") == name else None

    assert dkim.verify(signed, dnsfunc=dns)
    # nothing of the private key is printed
    assert "PRIVATE" not in value and key_file.read_text().splitlines()[1] not in value


@needs_openssl
def test_refusals_exit_2_without_echoing_the_key(tmp_path: Path) -> None:
    encrypted = tmp_path / "locked.pem"
    subprocess.run(
        [
            "openssl",
            "genpkey",
            "-algorithm",
            "ed25519",
            "-aes256",
            "-pass",
            "pass:secret-pass",
            "-out",
            str(encrypted),
        ],
        check=True,
        capture_output=True,
    )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nNOTAKEYsecretish\n-----END PRIVATE KEY-----\n")
    good = genpkey(tmp_path / "ok.pem", "-algorithm", "ed25519")
    cases = [
        (["--key-file", str(encrypted)], "passphrase"),
        (["--key-file", str(garbage)], "not a PEM private key"),
        (["--key-file", str(tmp_path / "missing.pem")], "cannot read"),
        (["--key-file", str(good), "--domain", "exa mple.com"], "--domain"),
    ]
    for extra, words in cases:
        args = {"--domain": DOMAIN, "--selector": SELECTOR}
        flags = [*extra]
        for flag, default in args.items():
            if flag not in flags:
                flags += [flag, default]
        result = cli("dkim-record", *flags)
        assert result.returncode == 2, (extra, result.stdout, result.stderr)
        assert result.stdout == ""
        assert words in result.stderr
        assert "NOTAKEY" not in result.stderr
        assert encrypted.read_text().splitlines()[1] not in result.stderr
