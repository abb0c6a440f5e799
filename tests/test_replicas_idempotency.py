"""An idempotency key whose replica died mid-send is not stuck: after the reservation's lease
(--idempotency-lease) a repeat on another replica takes it over and sends. Real server
processes on one real PostgreSQL (tests/pg.py), a real aiosmtpd sink."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from mailsvc.v1 import mail_pb2, settings_pb2

from tests import pg
from tests.conftest import Server, start_sink
from tests.helpers import send, wait_until
from tests.test_replicas import start_replicas, stop_all

LEASE = 2.0


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port that takes TCP connections and never says a word: an SMTP server that hangs."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        yield int(listener.getsockname()[1])


def reserved_keys(pg_server: pg.PgServer, url: str) -> int:
    name = url.rsplit("/", 1)[1]
    sql = "SELECT count(*) FROM idempotency WHERE response IS NULL"
    return int(pg_server.psql(sql, database=name).strip())


def test_a_key_left_reserved_by_a_killed_replica_is_taken_over_after_the_lease(
    pg_server: pg.PgServer, tmp_path: Path, black_hole: int
) -> None:
    url = pg_server.create_database()
    sink = start_sink()
    replicas: list[Server] = []
    try:
        replicas = start_replicas(tmp_path, url, 2, "--idempotency-lease", str(LEASE))
        a, b = replicas
        hanging = settings_pb2.SmtpSettings(host="127.0.0.1", port=black_hole)
        a.put_settings(settings_pb2.MailSettings(smtp=hanging))
        request = mail_pb2.SendMailRequest(
            to=["idem@example.com"], subject="taken over", text="t", idempotency_key="k-dead"
        )
        errors: list[grpc.RpcError] = []

        def first() -> None:
            try:
                send(a, request, timeout=60)
            except grpc.RpcError as exc:
                errors.append(exc)

        caller = threading.Thread(target=first)
        caller.start()
        wait_until(lambda: reserved_keys(pg_server, url) == 1, 10, "the key reserved on A")
        a.proc.send_signal(signal.SIGKILL)  # not a.stop(): the call must see the replica go
        a.proc.wait(10)
        caller.join(10)
        assert errors and errors[0].code() == grpc.StatusCode.UNAVAILABLE

        b.put_settings(
            settings_pb2.MailSettings(
                smtp=settings_pb2.SmtpSettings(host=sink.host, port=sink.port)
            )
        )
        started = time.monotonic()
        response = send(b, request, timeout=30)
        assert response.status == mail_pb2.MessageStatus.MESSAGE_STATUS_SENT
        assert time.monotonic() - started < LEASE + 10
        assert [str(r.message["Subject"]) for r in sink.received] == ["taken over"]
        # The taker's response is the key's from now on.
        assert send(b, request, timeout=10) == response
        assert reserved_keys(pg_server, url) == 0
        assert len(sink.received) == 1
    finally:
        stop_all(replicas)
        sink.stop()
