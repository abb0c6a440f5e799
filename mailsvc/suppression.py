"""Which recipients of a mail are left out because they are on the suppression list (pure).

Addresses are compared case-insensitively on the address part only: `Bob <BOB@example.org>`
matches the entry `bob@example.org`. What is kept keeps its display name.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass
from email.utils import parseaddr
from typing import Generic, Protocol, TypeVar


class SuppressionReason(enum.IntEnum):
    """Why an address is suppressed; the numbers are mailsvc.v1.SuppressionReason's."""

    UNSPECIFIED = 0
    BOUNCE = 1
    COMPLAINT = 2
    UNSUBSCRIBE = 3
    MANUAL = 4


class _HasAddr(Protocol):
    @property
    def addr(self) -> str: ...


R = TypeVar("R", bound="_HasAddr | str")


def normalize_address(recipient: _HasAddr | str) -> str:
    """The lower-cased address part of a recipient (an Address or `Name <addr>` text)."""
    if isinstance(recipient, str):
        addr = parseaddr(recipient)[1] or recipient.strip()
    else:
        addr = recipient.addr
    return addr.lower()


def lookup_keys(*lists: Iterable[_HasAddr | str]) -> list[str]:
    """The distinct normalized addresses of every list, for one `Storage.suppressed` query."""
    return list(dict.fromkeys(normalize_address(r) for rs in lists for r in rs))


@dataclass(frozen=True, slots=True)
class Filtered(Generic[R]):
    """The recipients kept, and the addresses left out (normalized, each once, in order)."""

    to: tuple[R, ...]
    cc: tuple[R, ...]
    bcc: tuple[R, ...]
    suppressed: tuple[str, ...]

    @property
    def nothing_left(self) -> bool:
        return not (self.to or self.cc or self.bcc)


def apply_suppressions(
    to: Sequence[R], cc: Sequence[R], bcc: Sequence[R], suppressed: Set[str]
) -> Filtered[R]:
    """Leave out every recipient whose address is in `suppressed` (lower-cased addresses)."""
    if not suppressed:
        return Filtered(tuple(to), tuple(cc), tuple(bcc), ())
    left_out: dict[str, None] = {}

    def keep(recipients: Sequence[R]) -> tuple[R, ...]:
        kept = []
        for r in recipients:
            key = normalize_address(r)
            if key in suppressed:
                left_out[key] = None
            else:
                kept.append(r)
        return tuple(kept)

    return Filtered(keep(to), keep(cc), keep(bcc), tuple(left_out))
