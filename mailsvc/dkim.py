"""DKIM signing of outgoing mail (RFC 6376; Ed25519 per RFC 8463).

dkimpy canonicalizes and hashes (its tested code for the fiddly part); the signature itself is
made with `cryptography` (OpenSSL) because dkimpy's RSA is pure Python: about 7 ms per mail
for a 2048-bit key against 0.7 ms, on the SendMail hot path. The key is read once, by
`DkimSigner.from_settings`. No message here ever contains the key.
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

MIN_RSA_BITS = 1024
# Signed where present (RFC 6376 5.4.1's list, restricted to what our mails carry).
SIGNED_HEADERS = (
    b"from",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"reply-to",
    b"mime-version",
    b"content-type",
)
_SIGNED = frozenset(SIGNED_HEADERS)
_RELAXED = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
_HEADER = b"DKIM-Signature"
_B64_LINE = 72  # characters of the signature per folded line


class DkimKeyError(ValueError):
    """The DKIM private key cannot be used; the message says why in plain words, without the key."""


@dataclass(frozen=True, slots=True)
class _Key:
    algorithm: bytes  # a= of the signature
    k_tag: str  # k= of the DNS record
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    public: str  # p= of the DNS record

    def sign_digest(self, digest: bytes) -> bytes:
        if isinstance(self.private, rsa.RSAPrivateKey):
            return self.private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        # RFC 8463: ed25519-sha256 signs the SHA-256 digest of the canonical headers.
        return self.private.sign(digest)


def _load(pem: str | bytes) -> _Key:
    data = pem.encode() if isinstance(pem, str) else pem
    if not data.strip():
        raise DkimKeyError("no private key given")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # raised for an encrypted PEM; the library's own text is not shown (it may quote input)
        raise DkimKeyError(
            "the private key is protected by a passphrase; give it unencrypted"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise DkimKeyError("not a PEM private key (RSA or Ed25519)") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise DkimKeyError(
                f"the RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} are needed"
            )
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return _Key(b"rsa-sha256", "rsa", key, base64.b64encode(spki).decode())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return _Key(b"ed25519-sha256", "ed25519", key, base64.b64encode(raw).decode())
    raise DkimKeyError("unsupported key type; use RSA (1024 bits or more) or Ed25519")


def validate_private_key(pem: str | bytes) -> str | None:
    """None if the key can sign, else the problem in plain words (never the key)."""
    try:
        _load(pem)
    except DkimKeyError as exc:
        return str(exc)
    return None


def dns_txt_record(selector: str, domain: str, pem: str | bytes) -> tuple[str, str]:
    """The TXT record (name, value) that publishes the public half of `pem`."""
    key = _load(pem)
    return f"{selector}._domainkey.{domain}", f"v=DKIM1; k={key.k_tag}; p={key.public}"


class DkimSigner:
    """Signs mails for one domain and selector with one key."""

    __slots__ = ("_domain", "_key", "_selector")

    def __init__(self, *, domain: str, selector: str, key: _Key) -> None:
        self._domain = domain.encode("ascii")
        self._selector = selector.encode("ascii")
        self._key = key

    @classmethod
    def from_settings(cls, domain: str, selector: str, private_key_pem: str | bytes) -> DkimSigner:
        """Read the key once; raises DkimKeyError for a key that cannot sign."""
        if not domain or not selector:
            raise DkimKeyError("domain and selector are required")
        if not (domain.isascii() and selector.isascii()):
            raise DkimKeyError("domain and selector must be ASCII (IDNs in their xn-- form)")
        return cls(domain=domain, selector=selector, key=_load(private_key_pem))

    @property
    def algorithm(self) -> str:
        return self._key.algorithm.decode()

    def sign(self, message: bytes, *, now: float | None = None) -> bytes:
        """The message with one DKIM-Signature header field prepended."""
        linesep = b"\r\n" if b"\r\n" in message[:4096] else b"\n"
        end = message.find(linesep + linesep)
        if end < 0:
            headers, body = dkim.rfc822_parse(message)
        else:
            # Only the head goes through the line parser; the body is used as it is.
            headers, _ = dkim.rfc822_parse(message[: end + len(linesep)])
            body = message[end + 2 * len(linesep) :]
            if linesep == b"\n":
                body = body.replace(b"\n", b"\r\n")
        present = [name.lower() for name, _ in headers if name.lower() in _SIGNED]
        # From once more: a second From added on the way then breaks the signature.
        include = [*dict.fromkeys(present), b"from"]
        signed = _RELAXED.canonicalize_headers(dkim.select_headers(headers, include))
        body_hash = base64.b64encode(hashlib.sha256(_RELAXED.canonicalize_body(body)).digest())
        stamp = int(time.time() if now is None else now)
        tags = b"; ".join(
            [
                b"v=1",
                b"a=" + self._key.algorithm,
                b"c=relaxed/relaxed",
                b"d=" + self._domain,
                b"s=" + self._selector,
                b"t=%d" % stamp,
                b"h=" + b" : ".join(include),
                b"bh=" + body_hash,
                b"b=",
            ]
        )
        # What is hashed is exactly what is sent, folds included, minus the b= value.
        value: bytes = b" " + dkim.fold(tags, namelen=len(_HEADER) + 2, linesep=linesep)
        digest = hashlib.sha256()
        dkim.hash_headers(
            digest,
            _RELAXED,
            signed,
            include,
            (_HEADER, value),
            None,
        )
        signature = base64.b64encode(self._key.sign_digest(digest.digest()))
        folded = b"".join(
            linesep + b" " + signature[i : i + _B64_LINE]
            for i in range(0, len(signature), _B64_LINE)
        )
        return _HEADER + b":" + value + folded + linesep + message
