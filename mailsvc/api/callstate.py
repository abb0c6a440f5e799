"""Per-call state shared by the interceptor, the servicers and the access log."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

from mailsvc.auth import Principal


@dataclass(slots=True)
class CallInfo:
    """Per-call facts the servicer and the access log share."""

    principal: Principal
    start: float
    message_id: str = ""


_call: contextvars.ContextVar[CallInfo] = contextvars.ContextVar("mailsvc_call")
set_call = _call.set


def current_call() -> CallInfo:
    """The call being served; set by the interceptor before any handler runs."""
    return _call.get()
