"""Mailgun's delivery webhooks: `POST /webhooks/mailgun` on an aiohttp server.

The pure core (signature check, body parsing, what an event means for us) is separate from
the HTTP edge, which takes its collaborators as callables so it runs without a real store:

    signing key ─▶ verify ─▶ parse ─▶ (remember token + apply to record and suppression list)

The token is remembered in the same store transaction that applies the event. Remembering it
first, in a transaction of its own, lost events: when applying then failed (503), Mailgun's
retry with the same token was refused as a replay (406) and never retried again. Applying
first and remembering after would let two copies of one call both apply (a duplicate event
row). In one transaction a failure leaves nothing behind, so the retry is applied, and a replay
can never apply twice.

Answers: 200 accepted (also for events we ignore or messages we do not know), 400 malformed,
401 bad, missing or stale signature, 406 token replayed (Mailgun does not retry a 406),
413 body too large, 415 not JSON, 503 the store is away (Mailgun retries). Never a 500.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from mailsvc.storage.base import Event, Status, StorageError, Suppression
from mailsvc.suppression import SuppressionReason, normalize_address

log = logging.getLogger(__name__)

PATH = "/webhooks/mailgun"
MAX_BODY = 64 * 1024  # Mailgun's event bodies are a few KB
MAX_SKEW = 300.0  # seconds between the signature's timestamp and now, either way
TOKEN_TTL = 2 * MAX_SKEW  # a token older than the window is refused as stale anyway
_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_MAX_FIELD = 1024  # longer token, address or id strings are not Mailgun's


class Outcome(enum.Enum):
    """The result of checking a webhook's signature."""

    VALID = "valid"
    MISSING = "missing"
    INVALID = "invalid"
    STALE = "stale"


class MalformedEvent(ValueError):
    """The body is not a Mailgun event we can read; the message names the field, not its value."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MailgunEvent:
    """The parts of a Mailgun event we use."""

    event: str  # delivered, failed, complained, unsubscribed, opened, ...
    severity: str  # permanent or temporary for `failed`, else empty
    recipient: str  # lower-cased address part
    message_id: str  # Mailgun's id (the message-id header it set), without angle brackets
    timestamp: float | None
    code: int | None  # delivery-status.code (an SMTP code), for the detail


@dataclass(frozen=True, slots=True)
class Action:
    """What an event does: the record's new status (None: an event only) and a suppression."""

    status: Status | None
    suppress: SuppressionReason | None
    detail: str


def verify_signature(
    signing_key: str, timestamp: object, token: object, signature: object, now: float
) -> Outcome:
    """Mailgun's signature: hex HMAC-SHA256 of timestamp + token, within MAX_SKEW of now."""
    if not signing_key:
        return Outcome.INVALID
    if not (isinstance(timestamp, str | int) and isinstance(token, str)):
        return Outcome.MISSING
    if not isinstance(signature, str) or not token or len(token) > _MAX_FIELD:
        return Outcome.MISSING
    if not _HEX_SHA256.fullmatch(signature):
        return Outcome.INVALID
    stamp = str(timestamp)
    expected = hmac.new(signing_key.encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature.lower()):
        return Outcome.INVALID
    try:
        when = float(stamp)
    except ValueError:
        return Outcome.INVALID
    # NaN compares false with everything: refuse it explicitly.
    if not abs(now - when) <= MAX_SKEW:
        return Outcome.STALE
    return Outcome.VALID


def _str(data: Mapping[str, Any], key: str, path: str, *, required: bool = False) -> str:
    value = data.get(key)
    if value is None:
        if required:
            raise MalformedEvent(f"{path} is required")
        return ""
    if not isinstance(value, str) or len(value) > _MAX_FIELD:
        raise MalformedEvent(f"{path} must be a string")
    return value


def _obj(data: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedEvent(f"{path} must be an object")
    return value


def parse_event(body: Mapping[str, Any]) -> MailgunEvent:
    """The event of a webhook body (already JSON-decoded); raises MalformedEvent."""
    data = body.get("event-data")
    if not isinstance(data, dict):
        raise MalformedEvent("event-data must be an object")
    event = _str(data, "event", "event-data.event", required=True)
    if not event:
        raise MalformedEvent("event-data.event is required")
    recipient = _str(data, "recipient", "event-data.recipient")
    if event in _NEEDS_RECIPIENT and not recipient.strip():
        raise MalformedEvent("event-data.recipient is required")
    message = _obj(data, "message", "event-data.message")
    headers = _obj(message, "headers", "event-data.message.headers")
    message_id = _str(headers, "message-id", "event-data.message.headers.message-id")
    stamp = data.get("timestamp")
    if stamp is not None and (isinstance(stamp, bool) or not isinstance(stamp, int | float)):
        raise MalformedEvent("event-data.timestamp must be a number")
    code = _obj(data, "delivery-status", "event-data.delivery-status").get("code")
    return MailgunEvent(
        event=event,
        severity=_str(data, "severity", "event-data.severity"),
        recipient=normalize_address(recipient) if recipient else "",
        message_id=message_id.strip().removeprefix("<").removesuffix(">"),
        timestamp=float(stamp) if stamp is not None else None,
        code=code if isinstance(code, int) and not isinstance(code, bool) else None,
    )


_NEEDS_RECIPIENT = frozenset({"failed", "complained", "unsubscribed"})


def action_for(event: MailgunEvent) -> Action | None:
    """What the event means for the record and the suppression list; None: ignored."""
    who = event.recipient or "a recipient"
    code = f" (code {event.code})" if event.code is not None else ""
    if event.event == "delivered":
        return Action(Status.DELIVERED, None, f"mailgun: delivered to {who}")
    if event.event == "failed":
        if event.severity == "permanent":
            return Action(
                Status.BOUNCED,
                SuppressionReason.BOUNCE,
                f"mailgun: permanent failure for {who}{code}; address suppressed",
            )
        return Action(None, None, f"mailgun: temporary failure for {who}{code}; Mailgun retries")
    if event.event == "complained":
        return Action(
            Status.COMPLAINED,
            SuppressionReason.COMPLAINT,
            f"mailgun: {who} reported it as spam; address suppressed",
        )
    if event.event == "unsubscribed":
        return Action(
            None, SuppressionReason.UNSUBSCRIBE, f"mailgun: {who} unsubscribed; address suppressed"
        )
    return None


class Applied(enum.Enum):
    """What became of a signed, well-formed call."""

    APPLIED = "accepted"  # the record changed (and the recipient was suppressed, if asked)
    IGNORED = "ignored"  # an event we do not track, or a mail we do not know
    REPLAYED = "replayed"  # the token was seen before: nothing changed


class EventStore(Protocol):
    """The part of mailsvc.storage.base.Storage that applying events uses."""

    async def remember_token(self, token: str, *, now: float, ttl: float) -> bool: ...

    async def webhook_event(
        self,
        token: str,
        *,
        ttl: float,
        header_message_id: str,
        status: Status | None,
        detail: str,
        suppression: Suppression | None,
        now: float,
    ) -> tuple[bool, Event | None]: ...


class StoreApplier:
    """Applies a call to the store: token, record and suppression in one transaction."""

    __slots__ = ("_on_suppressed", "_store")

    def __init__(
        self, store: EventStore, *, on_suppressed: Callable[[], None] = lambda: None
    ) -> None:
        self._store = store
        # Tells this process's suppression cache at once (mailsvc.sending.SuppressionCache).
        self._on_suppressed = on_suppressed

    async def __call__(
        self, token: str, event: MailgunEvent, action: Action | None, now: float
    ) -> Applied:
        if action is None or not event.message_id:
            # Nothing to apply; the token is still spent, so a replay is told apart.
            fresh = await self._store.remember_token(token, now=now, ttl=TOKEN_TTL)
            return Applied.IGNORED if fresh else Applied.REPLAYED
        suppression = None
        if action.suppress is not None and event.recipient:
            suppression = Suppression(
                address=event.recipient,
                reason=action.suppress,
                create_time=now,
                detail=action.detail,
            )
        fresh, written = await self._store.webhook_event(
            token,
            ttl=TOKEN_TTL,
            header_message_id=event.message_id,
            status=action.status,
            detail=action.detail,
            suppression=suppression,
            now=now,
        )
        if not fresh:
            return Applied.REPLAYED
        if written is not None and suppression is not None:
            self._on_suppressed()
        # Not one of ours (or purged): ignored, as the contract says.
        return Applied.APPLIED if written is not None else Applied.IGNORED


SigningKey = Callable[[], str]  # the current settings' key; "" when none is set
# (token, event, action or None, now) -> what became of it
ApplyEvent = Callable[[str, MailgunEvent, Action | None, float], Awaitable[Applied]]
Outcomes = Callable[[str], None]  # counts a request by its outcome (metrics)
Events = Callable[[str], None]  # counts an applied or ignored event by its type (metrics)


def _ignore(_: str) -> None:
    pass


# Metric labels of the answers; a bounded set whatever the callers send.
_OUTCOMES = {
    200: "ok",
    400: "malformed",
    401: "unauthorized",
    406: "replayed",
    413: "too_large",
    415: "unsupported_type",
    503: "unavailable",
}


def _event_label(event: MailgunEvent, action: Action | None) -> str:
    """A metric label for the event: a bounded set whatever the callers send."""
    if action is None:
        return "other"
    if event.event == "failed":
        return "failed_permanent" if event.severity == "permanent" else "failed_temporary"
    return event.event


def _answer(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


class MailgunWebhook:
    """The request handler; collaborators are passed in so it can run without a real store."""

    __slots__ = ("_apply", "_clock", "_count_event", "_count_outcome", "_signing_key")

    def __init__(
        self,
        *,
        signing_key: SigningKey,
        apply: ApplyEvent,
        clock: Callable[[], float] = time.time,
        count_outcome: Outcomes = _ignore,
        count_event: Events = _ignore,
    ) -> None:
        self._signing_key = signing_key
        self._apply = apply
        self._clock = clock
        self._count_outcome = count_outcome
        self._count_event = count_event

    async def handle(self, request: web.Request) -> web.Response:
        """Answer one webhook request; never raises (but for cancellation)."""
        response = await self._answered(request)
        self._count_outcome(_OUTCOMES.get(response.status, str(response.status)))
        return response

    async def _answered(self, request: web.Request) -> web.Response:
        try:
            return await self._handle(request)
        except web.HTTPRequestEntityTooLarge:
            return _answer(413, f"body larger than {MAX_BODY} bytes")
        except StorageError:
            log.warning("mailgun webhook: the store is unavailable")
            return _answer(503, "temporarily unavailable; retry later")
        except Exception:
            log.exception("mailgun webhook: unexpected error")
            return _answer(503, "temporarily unavailable; retry later")

    async def _handle(self, request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return _answer(415, "the body must be JSON (Content-Type: application/json)")
        if request.content_length is not None and request.content_length > MAX_BODY:
            return _answer(413, f"body larger than {MAX_BODY} bytes")
        raw = await request.read()  # bounded by the application's client_max_size
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            return _answer(400, "the body is not valid JSON")
        if not isinstance(body, dict):
            return _answer(400, "the body must be a JSON object")

        now = self._clock()
        key = self._signing_key()
        if not key:
            log.warning("mailgun webhook refused: no webhook signing key is set")
        sig = body.get("signature")
        sig = sig if isinstance(sig, dict) else {}
        outcome = verify_signature(
            key, sig.get("timestamp"), sig.get("token"), sig.get("signature"), now
        )
        if outcome is not Outcome.VALID:
            log.info("mailgun webhook refused: signature %s", outcome.value)
            return _answer(401, f"signature {outcome.value}")

        try:
            event = parse_event(body)
        except MalformedEvent as exc:
            return _answer(400, str(exc))
        action = action_for(event)
        applied = await self._apply(str(sig["token"]), event, action, now)
        if applied is Applied.REPLAYED:
            log.info("mailgun webhook refused: token replayed")
            return _answer(406, "token already used")
        self._count_event(_event_label(event, action))
        if action is not None:
            log.info(
                "mailgun webhook: %s%s for message %s: %s",
                event.event,
                f" ({event.severity})" if event.severity else "",
                event.message_id or "-",
                "applied" if applied is Applied.APPLIED else "unknown message, ignored",
            )
        return _answer(200, applied.value)


def make_app(handler: MailgunWebhook) -> web.Application:
    """The aiohttp application serving POST /webhooks/mailgun."""
    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(PATH, handler.handle)
    return app


class WebhookServer:
    """A running webhook HTTP server; `port` is the one bound (useful with port 0)."""

    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self._runner = runner
        self.port = port

    @classmethod
    async def start(cls, app: web.Application, host: str, port: int) -> WebhookServer:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        bound = runner.addresses[0][1]
        return cls(runner, int(bound))

    async def aclose(self) -> None:
        await self._runner.cleanup()
