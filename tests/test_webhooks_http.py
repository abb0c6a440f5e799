"""POST /webhooks/mailgun over real HTTP on 127.0.0.1: signatures, replays, bad bodies, effects.

The webhook server runs in this process (aiohttp on its own loop in a thread) with the real
handler and StoreApplier; only the store is a recorder standing in for the one being built.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from mailsvc.storage.base import Event, Status, StorageError, Suppression
from mailsvc.suppression import SuppressionReason
from mailsvc.webhooks import (
    MAX_BODY,
    PATH,
    TOKEN_TTL,
    MailgunWebhook,
    StoreApplier,
    WebhookServer,
    make_app,
)

KEY = "whsec-0123456789abcdef"
KNOWN_ID = "20261124120000.1.ABCDEF@mg.example.com"


@dataclass
class RecordingStore:
    """Stands in for the Storage methods the webhook uses, and records each call."""

    known: set[str] = field(default_factory=lambda: {KNOWN_ID})
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry
    events: list[tuple[str, Status | None, str]] = field(default_factory=list)
    suppressions: list[Suppression] = field(default_factory=list)
    fail_with: Exception | None = None

    async def remember_token(self, token: str, *, now: float, ttl: float) -> bool:
        assert ttl == TOKEN_TTL
        if self.tokens.get(token, 0.0) > now:
            return False
        self.tokens[token] = now + ttl
        return True

    async def add_event(
        self, header_message_id: str, status: Status | None, detail: str, *, now: float
    ) -> Event | None:
        if self.fail_with is not None:
            raise self.fail_with
        self.events.append((header_message_id, status, detail))
        if header_message_id not in self.known:
            return None
        return Event(message_id="rec-1", time=now, status=status or Status.SENT, detail=detail)

    async def add_suppression(self, entry: Suppression) -> Suppression:
        self.suppressions.append(entry)
        return entry

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
    ) -> tuple[bool, Event | None]:
        # as the stores do it: one transaction, so a failure leaves not even the token
        if self.fail_with is not None:
            raise self.fail_with
        if not await self.remember_token(token, now=now, ttl=ttl):
            return False, None
        event = await self.add_event(header_message_id, status, detail, now=now)
        if event is not None and suppression is not None:
            await self.add_suppression(suppression)
        return True, event


@dataclass
class Webhook:
    url: str
    store: RecordingStore
    keys: list[str]  # the signing key the settings hold; [""] = none set

    def post(self, body: Any, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url, json=body, timeout=10, **kwargs)

    def post_raw(self, content: bytes | Iterator[bytes], content_type: str) -> httpx.Response:
        return httpx.post(
            self.url, content=content, headers={"Content-Type": content_type}, timeout=10
        )


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    store = RecordingStore()
    keys = [KEY]
    handler = MailgunWebhook(
        signing_key=lambda: keys[0],
        apply=StoreApplier(store),
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(
        WebhookServer.start(make_app(handler), "127.0.0.1", 0), loop
    ).result(timeout=10)
    try:
        yield Webhook(f"http://127.0.0.1:{server.port}{PATH}", store, keys)
    finally:
        asyncio.run_coroutine_threadsafe(server.aclose(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def signature(
    *, key: str = KEY, timestamp: int | None = None, token: str | None = None
) -> dict[str, str]:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    token = token or secrets.token_hex(25)
    digest = hmac.new(key.encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
    return {"timestamp": stamp, "token": token, "signature": digest}


def body(
    event: str = "delivered",
    *,
    message_id: str = f"<{KNOWN_ID}>",
    recipient: str = "Bob@Example.org",
    sig: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "event": event,
        "timestamp": time.time(),
        "id": "Ase7i2zsRYeDXztHGENqRA",
        "recipient": recipient,
        "message": {"headers": {"message-id": message_id, "to": recipient}},
        **extra,
    }
    return {"signature": signature() if sig is None else sig, "event-data": data}


def test_delivered_marks_the_record(webhook: Webhook) -> None:
    r = webhook.post(body("delivered"))
    assert r.status_code == 200, r.text
    assert r.json() == {"message": "accepted"}
    [(mid, status, detail)] = webhook.store.events
    assert (mid, status) == (KNOWN_ID, Status.DELIVERED)  # angle brackets removed
    assert "bob@example.org" in detail
    assert webhook.store.suppressions == []


@pytest.mark.parametrize(
    ("event", "extra", "status", "reason"),
    [
        (
            "failed",
            {"severity": "permanent", "delivery-status": {"code": 550}},
            Status.BOUNCED,
            SuppressionReason.BOUNCE,
        ),
        ("complained", {}, Status.COMPLAINED, SuppressionReason.COMPLAINT),
        ("unsubscribed", {}, None, SuppressionReason.UNSUBSCRIBE),
    ],
)
def test_events_that_suppress_the_recipient(
    webhook: Webhook,
    event: str,
    extra: dict[str, Any],
    status: Status | None,
    reason: SuppressionReason,
) -> None:
    r = webhook.post(body(event, recipient="Bob Builder <Bob@Example.ORG>", **extra))
    assert r.status_code == 200, r.text
    [(mid, got_status, detail)] = webhook.store.events
    assert (mid, got_status) == (KNOWN_ID, status)
    [entry] = webhook.store.suppressions
    assert (entry.address, entry.reason) == ("bob@example.org", reason)
    assert entry.detail == detail
    if event == "failed":
        assert "550" in detail


def test_temporary_failure_is_an_event_only(webhook: Webhook) -> None:
    extra: dict[str, Any] = {"severity": "temporary", "delivery-status": {"code": 452}}
    r = webhook.post(body("failed", **extra))
    assert r.status_code == 200
    [(mid, status, detail)] = webhook.store.events
    assert (mid, status) == (KNOWN_ID, None)
    assert "temporary" in detail and "452" in detail
    assert webhook.store.suppressions == []


def test_unknown_message_is_accepted_and_ignored(webhook: Webhook) -> None:
    r = webhook.post(body("failed", severity="permanent", message_id="<other@mg.example.com>"))
    assert r.status_code == 200
    assert r.json() == {"message": "ignored"}
    assert [e[0] for e in webhook.store.events] == ["other@mg.example.com"]
    assert webhook.store.suppressions == []  # not one of ours: nothing is suppressed


def test_events_we_do_not_track_are_ignored(webhook: Webhook) -> None:
    for event in ("opened", "clicked", "accepted"):
        r = webhook.post(body(event))
        assert (r.status_code, r.json()) == (200, {"message": "ignored"})
    assert webhook.store.events == [] and webhook.store.suppressions == []


@pytest.mark.parametrize(
    "make",
    [
        lambda: signature(key="another-key"),
        lambda: {**signature(), "signature": "0" * 64},
        lambda: {**signature(), "signature": "not hex"},
        lambda: {**signature(), "token": "changed-token"},
        lambda: {"timestamp": str(int(time.time())), "token": "t"},  # no signature
        lambda: {},
    ],
    ids=["other-key", "zeros", "not-hex", "token-changed", "no-signature", "empty"],
)
def test_bad_or_missing_signature_is_401(
    webhook: Webhook, make: Callable[[], dict[str, str]]
) -> None:
    r = webhook.post(body("complained", sig=make()))  # fresh, so only the flaw is wrong
    assert r.status_code == 401
    assert webhook.store.events == [] and webhook.store.suppressions == []
    assert webhook.store.tokens == {}  # a forged request does not burn the token


def test_no_signature_object_is_401(webhook: Webhook) -> None:
    payload = body("delivered")
    del payload["signature"]
    assert webhook.post(payload).status_code == 401
    assert webhook.store.events == []


@pytest.mark.parametrize(("offset", "expected"), [(-310, 401), (310, 401), (-280, 200), (280, 200)])
def test_timestamp_window_is_five_minutes_both_ways(
    webhook: Webhook, offset: int, expected: int
) -> None:
    sig = signature(timestamp=int(time.time()) + offset)
    r = webhook.post(body("delivered", sig=sig))
    assert r.status_code == expected, r.text
    assert len(webhook.store.events) == (1 if expected == 200 else 0)


def test_no_signing_key_configured_is_401(webhook: Webhook) -> None:
    webhook.keys[0] = ""
    r = webhook.post(body("delivered", sig=signature(key="")))
    assert r.status_code == 401
    assert webhook.store.events == []


def test_replayed_token_is_406_and_changes_nothing(webhook: Webhook) -> None:
    payload = body("complained")
    assert webhook.post(payload).status_code == 200
    again = webhook.post(payload)
    assert again.status_code == 406
    # a new event signed with the same token is a replay too
    other = body("delivered", sig=payload["signature"])
    assert webhook.post(other).status_code == 406
    assert len(webhook.store.events) == 1 and len(webhook.store.suppressions) == 1


def test_huge_body_is_413(webhook: Webhook) -> None:
    payload = body("delivered", padding="x" * MAX_BODY)
    assert webhook.post(payload).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        yield b'{"padding": "'
        for _ in range(MAX_BODY // 1024 + 1):
            yield b"y" * 1024
        yield b'"}'

    assert webhook.post_raw(chunks(), "application/json").status_code == 413
    assert webhook.store.events == [] and webhook.store.tokens == {}


@pytest.mark.parametrize(
    ("content", "content_type", "expected"),
    [
        (b"event=delivered&recipient=x", "application/x-www-form-urlencoded", 415),
        (b"{not json", "application/json", 400),
        (b"\xff\xfe", "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b'"text"', "application/json", 400),
        (b"", "application/json", 400),
    ],
)
def test_bodies_that_are_not_a_json_object(
    webhook: Webhook, content: bytes, content_type: str, expected: int
) -> None:
    r = webhook.post_raw(content, content_type)
    assert r.status_code == expected
    assert webhook.store.events == []


def _without(payload: dict[str, Any], *path: str) -> dict[str, Any]:
    node = payload["event-data"]
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return payload


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: {"signature": signature()}, "event-data"),
        (lambda: {"signature": signature(), "event-data": "delivered"}, "event-data"),
        (lambda: _without(body("delivered"), "event"), "event-data.event"),
        (lambda: body(""), "event-data.event"),
        (lambda: {"signature": signature(), "event-data": {"event": 5}}, "event-data.event"),
        (
            lambda: _without(body("failed", severity="permanent"), "recipient"),
            "event-data.recipient",
        ),
        (lambda: body("complained", recipient=" "), "event-data.recipient"),
        (lambda: body("delivered", message="x"), "event-data.message"),
        (lambda: body("delivered", message={"headers": {"message-id": 12}}), "message-id"),
        (lambda: body("delivered", timestamp="yesterday"), "event-data.timestamp"),
    ],
)
def test_malformed_event_is_400_naming_the_field(
    webhook: Webhook, make: Callable[[], dict[str, Any]], named: str
) -> None:
    # Built when the test runs: a timestamp made at collection may be stale by then.
    r = webhook.post(make())
    assert r.status_code == 400, r.text
    assert named in r.json()["message"]
    assert webhook.store.events == [] and webhook.store.suppressions == []


def test_store_failures_are_503_never_500(webhook: Webhook) -> None:
    webhook.store.fail_with = StorageError("database away")
    r = webhook.post(body("delivered"))
    assert r.status_code == 503
    assert "database" not in r.text
    webhook.store.fail_with = RuntimeError("a bug, with internals")
    r = webhook.post(body("delivered"))
    assert r.status_code == 503
    assert "internals" not in r.text


def test_a_call_that_failed_is_applied_when_retried_with_its_token(webhook: Webhook) -> None:
    payload = body("failed", severity="permanent")
    webhook.store.fail_with = StorageError("database away")
    assert webhook.post(payload).status_code == 503
    webhook.store.fail_with = None
    r = webhook.post(payload)  # Mailgun's retry: the same signature, token and body
    assert r.status_code == 200, r.text
    assert r.json() == {"message": "accepted"}
    assert len(webhook.store.events) == 1 and len(webhook.store.suppressions) == 1
    assert webhook.post(payload).status_code == 406


def test_only_post_on_the_webhook_path(webhook: Webhook) -> None:
    assert httpx.get(webhook.url, timeout=10).status_code == 405
    other = webhook.url.replace(PATH, "/webhooks/other")
    assert httpx.post(other, content=json.dumps(body()), timeout=10).status_code == 404
