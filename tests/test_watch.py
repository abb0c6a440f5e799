"""WatchMessages end to end: status changes in order, only one's own, auth, and the drain."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from mailsvc.v1 import mail_pb2, settings_pb2

from tests.conftest import ADMIN, USER, Server, SmtpSink, auth, make_token, smtp_settings
from tests.helpers import assert_error, expect_error, send, wait_until

ServerFactory = Callable[..., Server]
S = mail_pb2.MessageStatus
ALICE = auth(make_token([], sub="alice"))
BOB = auth(make_token([], sub="bob"))


class Watcher:
    """A WatchMessages call read on a thread of its own; live once its headers arrived."""

    def __init__(self, server: Server, metadata: Any, id: str = "", timeout: float = 30):
        self.events: list[mail_pb2.MessageEvent] = []
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()
        self.call = server.mail.WatchMessages(
            mail_pb2.WatchMessagesRequest(id=id), metadata=metadata, timeout=timeout
        )
        self.call.initial_metadata()  # the server subscribed before it sent these
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.append(event)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.ended.set()

    def of(self, id: str) -> list[str]:
        return [
            S.Name(e.status).removeprefix("MESSAGE_STATUS_")
            for e in list(self.events)
            if e.message_id == id
        ]

    def cancel(self) -> None:
        self.call.cancel()
        self.ended.wait(5)


@pytest.fixture
def open_server(server_factory: ServerFactory, smtp_sink: SmtpSink) -> Server:
    server = server_factory("--shutdown-grace", "20")
    server.put_settings(
        settings_pb2.MailSettings(smtp=smtp_settings(smtp_sink), enable_user_full_access=True)
    )
    return server


def request(**fields: Any) -> mail_pb2.SendMailRequest:
    return mail_pb2.SendMailRequest(to=["r@example.com"], subject="s", text="t", **fields)


def test_a_watcher_sees_queued_sending_sent_in_order(open_server: Server) -> None:
    watcher = Watcher(open_server, ADMIN)
    reply = send(open_server, request(queue=True))
    wait_until(lambda: "SENT" in watcher.of(reply.id), 10, "SENT seen")
    assert watcher.of(reply.id) == ["QUEUED", "SENDING", "SENT"]
    assert all(e.detail for e in watcher.events if e.message_id == reply.id)
    watcher.cancel()


def test_a_watcher_sees_its_own_messages_only(open_server: Server) -> None:
    bobs = Watcher(open_server, BOB)
    by_id = Watcher(open_server, ALICE)
    alices = send(open_server, request(queue=True), metadata=ALICE)
    wait_until(lambda: "SENT" in by_id.of(alices.id), 10, "alice's mail SENT")
    own = send(open_server, request(queue=True), metadata=BOB)
    wait_until(lambda: "SENT" in bobs.of(own.id), 10, "bob's mail SENT")
    assert {e.message_id for e in bobs.events} == {own.id}
    bobs.cancel()
    by_id.cancel()


def test_watching_one_id(open_server: Server) -> None:
    first = send(open_server, request(send_at=_in(3600)), metadata=ALICE)
    watcher = Watcher(open_server, ALICE, id=first.id)
    other = send(open_server, request(send_at=_in(3600)), metadata=ALICE)
    open_server.mail.CancelMessage(
        mail_pb2.CancelMessageRequest(id=other.id), metadata=ALICE, timeout=10
    )
    open_server.mail.CancelMessage(
        mail_pb2.CancelMessageRequest(id=first.id), metadata=ALICE, timeout=10
    )
    wait_until(lambda: watcher.events, 10, "an event")
    assert [(e.message_id, e.status) for e in watcher.events] == [
        (first.id, S.MESSAGE_STATUS_CANCELLED)
    ]
    watcher.cancel()
    for id in (first.id, "missing"):
        call = open_server.mail.WatchMessages(
            mail_pb2.WatchMessagesRequest(id=id), metadata=BOB, timeout=10
        )
        err = expect_error(grpc.StatusCode.NOT_FOUND, list, call)
        assert_error(err, grpc.StatusCode.NOT_FOUND, "MESSAGE_NOT_FOUND")


def test_an_unauthenticated_watch_is_refused(open_server: Server) -> None:
    call = open_server.mail.WatchMessages(mail_pb2.WatchMessagesRequest(), timeout=10)
    expect_error(grpc.StatusCode.UNAUTHENTICATED, list, call)
    bad = open_server.mail.WatchMessages(
        mail_pb2.WatchMessagesRequest(), metadata=auth("nope"), timeout=10
    )
    expect_error(grpc.StatusCode.UNAUTHENTICATED, list, bad)
    assert USER  # a valid token without roles may watch (its own messages)
    Watcher(open_server, USER).cancel()


def test_the_server_drains_with_an_open_watch(open_server: Server) -> None:
    watcher = Watcher(open_server, ADMIN, timeout=60)
    started = time.monotonic()
    open_server.proc.send_signal(signal.SIGTERM)
    assert open_server.proc.wait(15) == 0
    assert time.monotonic() - started < 10  # not the 20 s grace
    assert watcher.ended.wait(5)
    assert watcher.error is not None
    assert watcher.error.code() == grpc.StatusCode.UNAVAILABLE


def _in(seconds: float) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.FromNanoseconds(int((time.time() + seconds) * 1e9))
    return stamp
