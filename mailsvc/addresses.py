"""What may go into a header: mailboxes, header text, MIME types, host names."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import formataddr
from functools import lru_cache

from email_validator import EmailNotValidError, validate_email

from mailsvc.errors import FieldViolation

# C0 controls (CR, LF, NUL, TAB, VT, FF...), DEL, C1 controls (NEL...) and the Unicode line
# and paragraph separators: any of them can end or split a header line somewhere.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,127}")  # RFC 2045/6838 token, for MIME types
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
CONTROL_CHARACTERS = "must not contain control characters (CR, LF, NUL, TAB...)"


@dataclass(frozen=True)
class Address:
    """One mailbox: an optional display name and the ASCII addr-spec used in the envelope."""

    name: str
    addr: str

    def __str__(self) -> str:
        return formataddr((self.name, self.addr)) if self.name else self.addr


def has_control(value: str) -> bool:
    """Whether `value` holds a character that must never reach a header."""
    return _CONTROL.search(value) is not None


@lru_cache(maxsize=4096)
def _parse_address(value: str) -> Address | None:
    try:
        result = validate_email(
            value,
            check_deliverability=False,
            allow_display_name=True,
            allow_smtputf8=False,
            test_environment=True,
            globally_deliverable=False,
        )
    except EmailNotValidError:
        return None
    return Address(result.display_name or "", result.ascii_email or result.normalized)


def parse_address(value: str, field_path: str, violations: list[FieldViolation]) -> Address | None:
    """Parse one address (`addr` or `Name <addr>`); a bad one is recorded in `violations`."""
    if has_control(value):
        violations.append(FieldViolation(field_path, CONTROL_CHARACTERS))
        return None
    address = _parse_address(value.strip())
    if address is None:
        violations.append(
            FieldViolation(field_path, f"{value!r} is not a single valid email address")
        )
    return address


def parse_addresses(
    values: Iterable[str], field_path: str, violations: list[FieldViolation]
) -> tuple[Address, ...]:
    parsed = (parse_address(v, f"{field_path}[{i}]", violations) for i, v in enumerate(values))
    return tuple(a for a in parsed if a is not None)


def check_header_text(value: str, field_path: str, violations: list[FieldViolation]) -> None:
    if has_control(value):
        violations.append(FieldViolation(field_path, CONTROL_CHARACTERS))


def is_mime_type(value: str) -> bool:
    """`type/subtype`, each an RFC 2045 token of at most 127 characters, no parameters."""
    main, slash, sub = value.partition("/")
    return bool(slash) and _TOKEN.fullmatch(main) is not None and _TOKEN.fullmatch(sub) is not None


def is_host_name(value: str) -> bool:
    """A DNS host name (IDNA allowed): dot-separated labels of letters, digits and `-`."""
    if not value or has_control(value):
        return False
    try:
        ascii_name = value.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return False
    labels = ascii_name.split(".")
    return len(ascii_name) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def is_loopback_host(host: str) -> bool:
    """Whether `host`, as configured, names this machine: 127.0.0.0/8, ::1 or localhost.

    Only the configured string counts: a name that resolves to a loopback address today may
    resolve elsewhere tomorrow, so it is not trusted with a password in clear text.
    """
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in ("localhost", "localhost."):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback
