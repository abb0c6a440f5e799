"""What every transport offers: send one validated mail, or raise a MailsvcError."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mailsvc.errors import ResourceExhausted
from mailsvc.message import Mail


@dataclass(frozen=True)
class Delivery:
    """What a transport reports after handing a mail over."""

    message_id: str
    transport: str
    recipients: list[str]


class Transport(Protocol):
    name: str

    async def send(self, mail: Mail, *, timeout: float, message_id: str = "") -> Delivery:
        """`message_id`: the Message-ID header to use (every attempt of a queued mail reuses
        one); empty = a new one."""
        ...

    async def aclose(self) -> None: ...


def check_size(size: int, limit: int) -> None:
    if size > limit:
        raise ResourceExhausted(
            f"message is {size} bytes encoded, over the limit of {limit} bytes",
            reason="MESSAGE_TOO_LARGE",
        )
