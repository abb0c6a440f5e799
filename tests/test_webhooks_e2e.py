"""Mailgun's delivery webhooks end to end: the real server with --webhook-listen, real HTTP.

Records of sent mails are put in the server's store (its SQLite file, through the store's own
API) before it starts, as a synchronous send leaves them; what the webhook changed is read
from that file read-only while the server runs. `test_mails_sent_synchronously_are_tracked`
does it from real sends, checked through GetMessage and the SuppressionService.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import socket
import sqlite3
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import field_mask_pb2
from mailsvc.v1 import mail_pb2, settings_pb2, suppression_pb2, suppression_pb2_grpc

from mailsvc.storage.base import NewMessage, Status
from mailsvc.storage.sqlite import FILE_NAME, SqliteStorage
from tests.conftest import (
    MAILGUN_KEY,
    SUPERADMIN,
    MailgunStandIn,
    Server,
    free_port,
    smtp_settings,
)
from tests.helpers import ServerFactory, SmtpFactory, assert_error, send, send_fails

KEY = "whsec-e2e-0123456789abcdef"
PATH = "/webhooks/mailgun"
T0 = time.time() - 60
# record id -> (transport, message_id as the send answered it)
RECORDS = {
    "rec-delivered": ("mailgun", "<20261124.1.AAA@mg.example.com>"),
    "rec-bounced": ("mailgun", "<20261124.2.BBB@mg.example.com>"),
    "rec-complained": ("mailgun", "<20261124.3.CCC@mg.example.com>"),
    "rec-unsubscribed": ("mailgun", "<20261124.4.DDD@mg.example.com>"),
    "rec-temporary": ("mailgun", "<20261124.5.EEE@mg.example.com>"),
    "rec-smtp": ("smtp", "<1732449600.abc123@example.com>"),
}


def seed(data_dir: Path) -> None:
    """Records as synchronous sends leave them: SENT, message_id = the provider's id."""

    data_dir.mkdir(parents=True, exist_ok=True)

    async def main() -> None:
        store = SqliteStorage(data_dir / FILE_NAME)
        await store.open()
        try:
            await store.insert(
                [
                    NewMessage(
                        id=record_id,
                        caller="ops",
                        status=Status.SENT,
                        to=(f"{record_id}@example.org",),
                        subject=record_id,
                        create_time=T0,
                        send_time=T0,
                        transport=transport,
                        message_id=message_id,
                        header_message_id=message_id
                        if transport == "smtp"
                        else f"<{record_id}@example.com>",
                        detail="sent",
                    )
                    for record_id, (transport, message_id) in RECORDS.items()
                ]
            )
        finally:
            await store.aclose()

    asyncio.run(main())


@dataclass
class Hooks:
    server: Server
    url: str

    def db(self) -> sqlite3.Connection:
        path = self.server.data_dir / FILE_NAME
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def status(self, record_id: str) -> Status:
        with self.db() as conn:
            (value,) = conn.execute(
                "SELECT status FROM messages WHERE id = ?", (record_id,)
            ).fetchone()
        return Status(value)

    def events(self, record_id: str) -> list[tuple[Status, str]]:
        with self.db() as conn:
            rows = conn.execute(
                "SELECT e.status, e.detail FROM events e JOIN messages m ON m.seq = e.message_seq"
                " WHERE m.id = ? ORDER BY e.seq",
                (record_id,),
            ).fetchall()
        return [(Status(s), d) for s, d in rows]

    def suppressions(self) -> dict[str, int]:
        with self.db() as conn:
            return dict(conn.execute("SELECT address, reason FROM suppressions").fetchall())

    def state(self) -> tuple[object, ...]:
        """Everything a webhook may change, to show that a refusal changed nothing."""
        with self.db() as conn:
            return (
                conn.execute("SELECT id, status, update_time FROM messages ORDER BY id").fetchall(),
                conn.execute("SELECT count(*) FROM events").fetchone(),
                conn.execute("SELECT * FROM suppressions ORDER BY address").fetchall(),
            )

    def post(self, payload: Any) -> httpx.Response:
        return httpx.post(self.url, json=payload, timeout=10)

    def post_raw(self, content: bytes, content_type: str = "application/json") -> httpx.Response:
        return httpx.post(
            self.url, content=content, headers={"Content-Type": content_type}, timeout=10
        )


def signature(*, key: str = KEY, timestamp: float | None = None, token: str = "") -> dict[str, str]:
    stamp = str(int(time.time() if timestamp is None else timestamp))
    token = token or secrets.token_hex(25)
    digest = hmac.new(key.encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
    return {"timestamp": stamp, "token": token, "signature": digest}


def event(
    kind: str,
    record_id: str = "rec-delivered",
    *,
    message_id: str | None = None,
    recipient: str = "Bob <Bob@Example.ORG>",
    sig: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    mid = message_id if message_id is not None else RECORDS[record_id][1]
    data = {
        "event": kind,
        "timestamp": time.time(),
        "id": secrets.token_hex(8),
        "recipient": recipient,
        "message": {"headers": {"message-id": mid.strip("<>")}},
        **extra,
    }
    return {"signature": sig or signature(), "event-data": data}


def start(
    server_factory: ServerFactory,
    tmp_path: Path,
    *args: str,
    signing_key: str = KEY,
    mailgun_url: str = "http://127.0.0.1:9",
) -> Hooks:
    data_dir = tmp_path / "data"
    seed(data_dir)
    port = free_port()
    server = server_factory(
        "--webhook-listen",
        f"127.0.0.1:{port}",
        "--mailgun-base-url",
        mailgun_url,
        *args,
        data_dir=data_dir,
    )
    server.put_settings(
        settings_pb2.MailSettings(
            default_from="sender@example.com",
            mailgun=settings_pb2.MailgunSettings(
                domain="mg.example.com", key=MAILGUN_KEY, webhook_signing_key=signing_key
            ),
        )
    )
    return Hooks(server, f"http://127.0.0.1:{port}{PATH}")


@pytest.fixture
def hooks(server_factory: ServerFactory, tmp_path: Path) -> Hooks:
    return start(server_factory, tmp_path)


def test_delivered_marks_the_record_delivered(hooks: Hooks) -> None:
    r = hooks.post(event("delivered", "rec-delivered"))
    assert r.status_code == 200, r.text
    assert r.json() == {"message": "accepted"}
    assert hooks.status("rec-delivered") is Status.DELIVERED
    assert hooks.events("rec-delivered")[-1][0] is Status.DELIVERED
    assert hooks.suppressions() == {}
    # the others are untouched
    assert hooks.status("rec-bounced") is Status.SENT


def test_smtp_mail_is_matched_by_its_message_id_header(hooks: Hooks) -> None:
    r = hooks.post(event("delivered", "rec-smtp"))
    assert r.status_code == 200 and r.json() == {"message": "accepted"}
    assert hooks.status("rec-smtp") is Status.DELIVERED


@pytest.mark.parametrize(
    ("kind", "record_id", "extra", "status", "reason"),
    [
        ("failed", "rec-bounced", {"severity": "permanent"}, Status.BOUNCED, 1),
        ("complained", "rec-complained", {}, Status.COMPLAINED, 2),
        ("unsubscribed", "rec-unsubscribed", {}, Status.SENT, 3),
    ],
)
def test_events_that_suppress_the_recipient(
    hooks: Hooks,
    kind: str,
    record_id: str,
    extra: dict[str, Any],
    status: Status,
    reason: int,
) -> None:
    before = len(hooks.events(record_id))
    r = hooks.post(event(kind, record_id, **extra))
    assert r.status_code == 200 and r.json() == {"message": "accepted"}, r.text
    assert hooks.status(record_id) is status
    assert len(hooks.events(record_id)) == before + 1
    assert hooks.suppressions() == {"bob@example.org": reason}


def test_temporary_failure_is_an_event_only(hooks: Hooks) -> None:
    extra: dict[str, Any] = {"severity": "temporary", "delivery-status": {"code": 452}}
    payload = event("failed", "rec-temporary", **extra)
    r = hooks.post(payload)
    assert r.status_code == 200, r.text
    assert hooks.status("rec-temporary") is Status.SENT
    status, detail = hooks.events("rec-temporary")[-1]
    assert status is Status.SENT and "temporary" in detail and "452" in detail
    assert hooks.suppressions() == {}


def _stale() -> dict[str, str]:
    return signature(timestamp=time.time() - 301)


def _wrong_key() -> dict[str, str]:
    return signature(key="not-the-key")


def test_refusals_change_nothing(hooks: Hooks) -> None:
    state = hooks.state()
    bounce: dict[str, Any] = {"severity": "permanent"}
    cases: list[tuple[Callable[[], httpx.Response], int]] = [
        (lambda: hooks.post(event("failed", "rec-bounced", sig=_wrong_key(), **bounce)), 401),
        (lambda: hooks.post(event("failed", "rec-bounced", sig=_stale(), **bounce)), 401),
        (lambda: hooks.post({"event-data": event("delivered")["event-data"]}), 401),
        (lambda: hooks.post(event("delivered", padding="x" * 70_000)), 413),
        (lambda: hooks.post_raw(b"{not json"), 400),
        (lambda: hooks.post_raw(b"event=delivered", "application/x-www-form-urlencoded"), 415),
        (lambda: hooks.post({"signature": signature()}), 400),
        (lambda: hooks.post(event("failed", "rec-bounced", recipient="", **bounce)), 400),
    ]
    for call, expected in cases:
        r = call()
        assert r.status_code == expected, (expected, r.text)
        assert hooks.state() == state
    # an event for a mail we do not know is accepted and ignored
    r = hooks.post(event("failed", message_id="<unknown@mg.example.com>", severity="permanent"))
    assert r.status_code == 200 and r.json() == {"message": "ignored"}
    assert hooks.state() == state


def test_a_replayed_token_is_406_and_changes_nothing(hooks: Hooks) -> None:
    payload = event("delivered", "rec-delivered")
    assert hooks.post(payload).status_code == 200
    state = hooks.state()
    assert hooks.post(payload).status_code == 406
    # another event signed with the same token is a replay too
    other = event("failed", "rec-bounced", sig=payload["signature"], severity="permanent")
    assert hooks.post(other).status_code == 406
    assert hooks.state() == state


def test_the_signing_key_is_read_from_the_current_settings(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    hooks = start(server_factory, tmp_path, signing_key="")
    state = hooks.state()
    r = hooks.post(event("delivered"))
    assert r.status_code == 401  # no key stored: every call is refused
    assert hooks.state() == state
    request = settings_pb2.UpdateMailSettingsRequest(
        settings=settings_pb2.MailSettings(
            mailgun=settings_pb2.MailgunSettings(webhook_signing_key=KEY)
        ),
        update_mask=field_mask_pb2.FieldMask(paths=["mailgun.webhook_signing_key"]),
    )
    hooks.server.settings.UpdateMailSettings(request, metadata=SUPERADMIN, timeout=10)
    assert hooks.post(event("delivered")).status_code == 200
    assert hooks.status("rec-delivered") is Status.DELIVERED
    # a new key: calls signed with the old one are refused from the next call on
    request.settings.mailgun.webhook_signing_key = "rotated-key"
    hooks.server.settings.UpdateMailSettings(request, metadata=SUPERADMIN, timeout=10)
    assert hooks.post(event("complained", "rec-complained")).status_code == 401
    good = event("complained", "rec-complained", sig=signature(key="rotated-key"))
    assert hooks.post(good).status_code == 200
    hooks.server.stop()
    assert KEY not in hooks.server.logs() and "rotated-key" not in hooks.server.logs()


def metric_samples(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("mailsvc_webhook") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_requests_and_events_are_counted(server_factory: ServerFactory, tmp_path: Path) -> None:
    metrics_port = free_port()
    hooks = start(server_factory, tmp_path, "--metrics-listen", f"127.0.0.1:{metrics_port}")
    hooks.post(event("delivered", "rec-delivered"))
    hooks.post(event("failed", "rec-bounced", severity="permanent"))
    hooks.post(event("opened", "rec-delivered"))
    hooks.post(event("delivered", sig=_wrong_key()))
    samples = metric_samples(metrics_port)
    assert samples['mailsvc_webhook_requests_total{outcome="ok"}'] == 3
    assert samples['mailsvc_webhook_requests_total{outcome="unauthorized"}'] == 1
    assert samples['mailsvc_webhook_events_total{type="delivered"}'] == 1
    assert samples['mailsvc_webhook_events_total{type="failed_permanent"}'] == 1
    assert samples['mailsvc_webhook_events_total{type="other"}'] == 1


def test_a_busy_webhook_port_stops_the_start(server_factory: ServerFactory, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = server_factory("--webhook-listen", f"127.0.0.1:{port}", wait=False)
        assert server.proc.wait(timeout=30) == 2
    assert f"cannot serve webhooks on 127.0.0.1:{port}" in server.logs()


def test_sigterm_stops_the_webhook_server(hooks: Hooks) -> None:
    assert hooks.post(event("delivered")).status_code == 200
    assert hooks.server.stop() == 0
    with pytest.raises(httpx.ConnectError):
        hooks.post(event("delivered"))


def test_the_webhook_port_is_configured_by_env(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    port = free_port()
    server_factory(env={"MAILSVC_WEBHOOK_LISTEN": f"127.0.0.1:{port}"})
    r = httpx.post(f"http://127.0.0.1:{port}{PATH}", json={}, timeout=10)
    assert r.status_code == 401  # served, and no key stored


def get_message(server: Server, record_id: str) -> Any:
    request = mail_pb2.GetMessageRequest(id=record_id)
    return server.mail.GetMessage(request, metadata=SUPERADMIN, timeout=10)


def listed_suppressions(server: Server) -> dict[str, int]:
    stub = suppression_pb2_grpc.SuppressionServiceStub(server.channel)
    reply = stub.ListSuppressions(
        suppression_pb2.ListSuppressionsRequest(), metadata=SUPERADMIN, timeout=10
    )
    return {s.address: s.reason for s in reply.suppressions}


def test_mails_sent_synchronously_are_tracked(
    server_factory: ServerFactory,
    tmp_path: Path,
    mailgun: MailgunStandIn,
    smtp_factory: SmtpFactory,
) -> None:
    hooks = start(server_factory, tmp_path, mailgun_url=mailgun.base_url)
    # Mailgun: the record keeps Mailgun's id, which its events carry
    reply = send(hooks.server, to=["bob@example.org"], subject="hi", text="hello")
    assert reply.transport == "mailgun"
    record = get_message(hooks.server, reply.id)
    assert record.status == Status.SENT and record.message_id == reply.message_id
    r = hooks.post(event("delivered", message_id=reply.message_id))
    assert r.status_code == 200 and r.json() == {"message": "accepted"}
    assert get_message(hooks.server, reply.id).status == Status.DELIVERED
    bounce = event(
        "failed", message_id=reply.message_id, recipient="bob@example.org", severity="permanent"
    )
    assert hooks.post(bounce).json() == {"message": "accepted"}
    record = get_message(hooks.server, reply.id)
    assert record.status == Status.BOUNCED
    assert "permanent" in record.events[-1].detail
    assert listed_suppressions(hooks.server) == {"bob@example.org": 1}
    # the next mail to bob leaves him out at once (this process's suppression cache is told)
    err = send_fails(hooks.server, to=["bob@example.org"], subject="again", text="hello")
    assert_error(err, grpc.StatusCode.FAILED_PRECONDITION, "ALL_RECIPIENTS_SUPPRESSED")
    # SMTP: the record's message_id is the Message-ID header, which the events name
    sink = smtp_factory()
    settings = settings_pb2.MailSettings(
        default_from="sender@example.com", smtp=smtp_settings(sink)
    )
    request = settings_pb2.UpdateMailSettingsRequest(
        settings=settings, update_mask=field_mask_pb2.FieldMask(paths=["smtp", "mailgun"])
    )
    hooks.server.settings.UpdateMailSettings(request, metadata=SUPERADMIN, timeout=10)
    # the webhook key went with mailgun: store it again
    key_only = settings_pb2.UpdateMailSettingsRequest(
        settings=settings_pb2.MailSettings(
            mailgun=settings_pb2.MailgunSettings(
                domain="mg.example.com", key=MAILGUN_KEY, webhook_signing_key=KEY
            )
        ),
        update_mask=field_mask_pb2.FieldMask(paths=["mailgun"]),
    )
    hooks.server.settings.UpdateMailSettings(key_only, metadata=SUPERADMIN, timeout=10)
    reply = send(hooks.server, to=["carol@example.org"], subject="smtp", text="hello")
    assert reply.transport == "smtp"
    header = str(sink.wait_for(1)[0].message["Message-ID"])
    assert get_message(hooks.server, reply.id).message_id.strip("<>") == header.strip("<>")
    r = hooks.post(event("complained", message_id=header, recipient="carol@example.org"))
    assert r.json() == {"message": "accepted"}
    assert get_message(hooks.server, reply.id).status == Status.COMPLAINED
    assert listed_suppressions(hooks.server)["carol@example.org"] == 2
