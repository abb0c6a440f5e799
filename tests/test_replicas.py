"""Several replicas on one PostgreSQL (--database-url), end to end: real server processes,
a real PostgreSQL (tests/pg.py) and real aiosmtpd sinks. Settings, idempotency keys, the
queue, rate limits, suppressions and watches are shared; a replica killed mid-attempt or a
database restart loses no accepted mail."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from mailsvc.v1 import mail_pb2, settings_pb2, suppression_pb2, suppression_pb2_grpc

from mailsvc import payload
from mailsvc.addresses import Address
from mailsvc.message import Mail
from mailsvc.mime import new_message_id
from mailsvc.storage.base import NewMessage, Status
from mailsvc.storage.postgres import PostgresStorage
from tests import pg
from tests.conftest import (
    ADMIN,
    SMTP_LOGIN,
    SMTP_PASSWORD,
    SUPERADMIN,
    Server,
    SmtpSink,
    auth,
    free_port,
    make_token,
    serving,
    smtp_settings,
    start_server,
    start_sink,
    wait_serving,
)
from tests.helpers import (
    assert_error,
    clean_env,
    cli,
    expect_error,
    send,
    struct,
    wait_until,
)

S = mail_pb2.MessageStatus
ALICE = auth(make_token([], sub="alice"))
PROPAGATION = 1.5  # the contract's 1 s, and room for a loaded test machine


@dataclass
class Cluster:
    url: str
    replicas: list[Server]
    sink: SmtpSink

    def configure(self, settings: settings_pb2.MailSettings) -> settings_pb2.MailSettings:
        """Write through the first replica; return once every replica uses the result."""
        stored = self.replicas[0].put_settings(settings)
        for replica in self.replicas[1:]:
            wait_until(has_etag(replica, stored.etag), PROPAGATION, "settings propagated")
        return stored


def etag(server: Server) -> str:
    reply = server.settings.GetMailSettings(
        settings_pb2.GetMailSettingsRequest(), metadata=SUPERADMIN, timeout=5
    )
    return str(reply.etag)


def has_etag(server: Server, wanted: str) -> Callable[[], bool]:
    return lambda: etag(server) == wanted


def start_replicas(
    base: Path, url: str, count: int, *flags: str, env: dict[str, str] | None = None
) -> list[Server]:
    """`count` replicas started at the same moment, each with a data dir of its own."""
    replicas = [
        start_server(
            base / f"replica{i}",
            "--database-url",
            url,
            *flags,
            wait=False,
            env=env,
        )
        for i in range(count)
    ]
    for replica in replicas:
        wait_serving(replica, timeout=40)
    return replicas


def stop_all(replicas: list[Server]) -> None:
    for replica in replicas:
        if replica.proc.poll() is None:
            replica.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(pg_server: pg.PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three replicas started together on an empty database, and one SMTP sink."""
    url = pg_server.create_database()
    sink = start_sink()
    replicas = start_replicas(tmp_path_factory.mktemp("cluster"), url, 3)
    yield Cluster(url, replicas, sink)
    stop_all(replicas)
    sink.stop()


def base_settings(sink: SmtpSink, **fields: Any) -> settings_pb2.MailSettings:
    template = settings_pb2.MailTemplate(
        subject="{{ n }}", text="mail {{ n }}", model={"n": "string"}, roles=["user"]
    )
    return settings_pb2.MailSettings(smtp=smtp_settings(sink), templates={"t": template}, **fields)


def subjects(sink: SmtpSink) -> Counter[str]:
    return Counter(str(r.message["Subject"]) for r in list(sink.received))


# --- three replicas on one database ----------------------------------------------------------


def test_replicas_starting_together_on_an_empty_database_all_come_up(
    cluster: Cluster, pg_server: pg.PgServer
) -> None:
    assert all(serving(r) for r in cluster.replicas)
    name = cluster.url.rsplit("/", 1)[1]
    assert pg_server.psql("SELECT count(*) FROM schema_version", database=name).strip() == "1"


def test_settings_written_on_one_replica_are_used_by_the_others(cluster: Cluster) -> None:
    other = start_sink()
    try:
        cluster.configure(base_settings(cluster.sink))
        a, b, c = cluster.replicas
        started = time.monotonic()
        stored = a.put_settings(base_settings(other, default_from="moved@example.com"))
        for replica in (b, c):
            wait_until(has_etag(replica, stored.etag), PROPAGATION, "new etag")
        assert time.monotonic() - started < PROPAGATION
        send(c, to=["x@example.com"], subject="via c", text="t")
        (mail,) = other.wait_for(1)
        assert mail.message["From"] == "moved@example.com"
        assert not [r for r in cluster.sink.received if r.message["Subject"] == "via c"]
    finally:
        other.stop()


def test_one_idempotency_key_sent_to_two_replicas_at_once_sends_one_mail(
    cluster: Cluster,
) -> None:
    slow = start_sink(delay=1.0)
    try:
        cluster.configure(base_settings(slow))
        a, b, _ = cluster.replicas
        request = mail_pb2.SendMailRequest(
            to=["idem@example.com"], subject="once", text="t", idempotency_key="k-replicas"
        )
        barrier = threading.Barrier(2)

        def call(server: Server) -> mail_pb2.SendMailResponse:
            barrier.wait()
            return send(server, request, timeout=20)

        with ThreadPoolExecutor(2) as pool:
            first, second = pool.map(call, [a, b])
        assert first == second
        assert first.status == S.MESSAGE_STATUS_SENT
        slow.expect_no_more(0.5)
        assert [r.message["Subject"] for r in slow.received] == ["once"]
        assert slow.handler.data_commands == 1
    finally:
        slow.stop()


def test_300_queued_mails_over_three_replicas_arrive_exactly_once(cluster: Cluster) -> None:
    cluster.configure(base_settings(cluster.sink))
    before = len(cluster.sink.received)
    wanted = [f"q{i:03d}" for i in range(300)]

    def batch(i: int) -> list[str]:
        chunk = wanted[i * 100 : (i + 1) * 100]
        reply = cluster.replicas[i].mail.SendMailBatch(
            mail_pb2.SendMailBatchRequest(
                template_name="t",
                entries=[
                    mail_pb2.BatchEntry(to=[f"{n}@example.com"], parameters=struct({"n": n}))
                    for n in chunk
                ],
            ),
            metadata=SUPERADMIN,
            timeout=30,
        )
        return [r.id for r in reply.results]

    with ThreadPoolExecutor(3) as pool:
        ids = [id for chunk in pool.map(batch, range(3)) for id in chunk]
    assert len(set(ids)) == 300
    cluster.sink.wait_for(before + 300, timeout=60)
    cluster.sink.expect_no_more(1.0)
    got = subjects(cluster.sink)
    assert all(got[n] == 1 for n in wanted), [n for n in wanted if got[n] != 1][:10]


def test_rate_limits_count_across_replicas(cluster: Cluster) -> None:
    limit = settings_pb2.RateLimit(role="user", per_minute=3)
    cluster.configure(
        base_settings(cluster.sink, enable_user_full_access=True, rate_limits=[limit])
    )
    a, b, c = cluster.replicas
    for replica in (a, b, c):
        send(replica, to=["r@example.com"], subject="limited", text="t", metadata=ALICE)
    for replica in (a, b, c):
        err = expect_error(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            send,
            replica,
            to=["r@example.com"],
            subject="over",
            text="t",
            metadata=ALICE,
        )
        assert_error(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")


def test_a_watch_on_one_replica_sees_a_mail_sent_via_another_go_to_sent(
    cluster: Cluster,
) -> None:
    cluster.configure(base_settings(cluster.sink))
    a, b, _ = cluster.replicas
    call = a.mail.WatchMessages(mail_pb2.WatchMessagesRequest(), metadata=ADMIN, timeout=20)
    call.initial_metadata()  # subscribed
    seen: list[mail_pb2.MessageEvent] = []

    def read() -> None:
        try:
            for event in call:
                seen.append(event)
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        reply = send(b, to=["w@example.com"], subject="watched", text="t", queue=True)

        def sent() -> bool:
            mine = [e.status for e in list(seen) if e.message_id == reply.id]
            return S.MESSAGE_STATUS_SENT in mine

        wait_until(sent, 10, "SENT seen on replica A")
        mine = [e.status for e in seen if e.message_id == reply.id]
        assert mine[0] == S.MESSAGE_STATUS_QUEUED
        assert S.MESSAGE_STATUS_SENDING in mine
    finally:
        call.cancel()
        reader.join(5)


def test_a_suppression_added_on_one_replica_is_applied_by_the_others(cluster: Cluster) -> None:
    cluster.configure(base_settings(cluster.sink))
    a, b, _ = cluster.replicas
    # b has just looked at the (empty) list, so it believes the list empty for a while.
    send(b, to=["keep@example.com"], subject="warm", text="t")
    add_suppression(a, "gone@example.com")
    added = time.monotonic()
    while True:
        reply = send(b, to=["gone@example.com", "keep@example.com"], subject="s", text="t")
        if list(reply.suppressed) == ["gone@example.com"]:
            break
        assert time.monotonic() - added < PROPAGATION, "replica B did not learn in time"
        time.sleep(0.1)
    suppression_pb2_grpc.SuppressionServiceStub(a.channel).DeleteSuppression(
        suppression_pb2.DeleteSuppressionRequest(address="gone@example.com"),
        metadata=ADMIN,
        timeout=5,
    )


def test_queue_workers_are_woken_by_mail_another_process_queued(cluster: Cluster) -> None:
    """Without the wake-up each replica would look only every 30 s (queue.MAX_SLEEP)."""
    cluster.configure(base_settings(cluster.sink))

    async def insert() -> None:
        storage = PostgresStorage(cluster.url, pool_size=2)
        await storage.open()
        try:
            now = time.time()
            mail = Mail(
                sender=Address("", "other@example.com"),
                to=(Address("", "woken@example.com"),),
                subject="woken",
                text="queued elsewhere",
            )
            header = new_message_id(mail.sender)
            await storage.insert(
                [
                    NewMessage(
                        id=f"elsewhere{int(now * 1000)}",
                        caller="ops",
                        status=Status.QUEUED,
                        to=("woken@example.com",),
                        subject="woken",
                        create_time=now,
                        send_time=now,
                        payload=payload.encode(mail, header),
                        header_message_id=header,
                        detail="queued",
                    )
                ]
            )
        finally:
            await storage.aclose()

    asyncio.run(insert())
    wait_until(lambda: subjects(cluster.sink)["woken"] == 1, 5, "delivered by a replica")


# --- moving over ----------------------------------------------------------------------------


def test_migrate_to_database_copies_settings_acl_and_suppressions(
    pg_url: str, tmp_path: Path
) -> None:
    sink = start_sink(auth=True)
    data = tmp_path / "embedded"
    embedded = start_server(data)
    try:
        embedded.put_settings(base_settings(sink, default_from="from@example.com"))
        # the password goes in through a masked write, as an operator would set it
        embedded.settings.UpdateMailSettings(
            settings_pb2.UpdateMailSettingsRequest(
                settings=settings_pb2.MailSettings(
                    smtp=smtp_settings(sink, login=SMTP_LOGIN, password=SMTP_PASSWORD)
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["smtp"]),
            ),
            metadata=SUPERADMIN,
            timeout=10,
        )
        acl = settings_pb2.SettingsAcl(read_roles=["reader"], update_roles=["writer"])
        embedded.settings.UpdateSettingsAcl(
            settings_pb2.UpdateSettingsAclRequest(acl=acl), metadata=SUPERADMIN, timeout=10
        )
        add_suppression(embedded, "blocked@example.com")
    finally:
        embedded.stop()
    env = clean_env(MAILSVC_DATABASE_URL=pg_url)
    moved = cli("migrate-to-database", "--data-dir", str(data), env=env)
    assert moved.returncode == 0, moved.stderr
    assert "1 suppressions" in moved.stdout
    password = pg_url.split(":")[2].split("@")[0]
    assert password not in moved.stdout + moved.stderr

    replica = start_server(tmp_path / "replica", "--database-url", pg_url)
    try:
        stored = replica.settings.GetMailSettings(
            settings_pb2.GetMailSettingsRequest(), metadata=SUPERADMIN, timeout=5
        )
        assert stored.default_from == "from@example.com"
        assert stored.smtp.password_set and stored.smtp.login == SMTP_LOGIN
        assert set(stored.templates) == {"t"}
        got_acl = replica.settings.GetSettingsAcl(
            settings_pb2.GetSettingsAclRequest(), metadata=SUPERADMIN, timeout=5
        )
        assert got_acl == acl
        reply = send(replica, to=["blocked@example.com", "ok@example.com"], subject="m", text="t")
        assert list(reply.suppressed) == ["blocked@example.com"]
        (mail,) = sink.wait_for(1)  # the SMTP password came along: AUTH succeeded
        assert mail.rcpt_tos == ["ok@example.com"]
    finally:
        replica.stop()
        sink.stop()

    again = cli("migrate-to-database", "--data-dir", str(data), env=env)
    assert again.returncode == 1
    assert "--force" in again.stderr
    forced = cli("migrate-to-database", "--data-dir", str(data), "--force", env=env)
    assert forced.returncode == 0, forced.stderr


def add_suppression(server: Server, address: str) -> None:
    suppression_pb2_grpc.SuppressionServiceStub(server.channel).AddSuppression(
        suppression_pb2.AddSuppressionRequest(
            suppression=suppression_pb2.Suppression(
                address=address,
                reason=suppression_pb2.SuppressionReason.SUPPRESSION_REASON_MANUAL,
            )
        ),
        metadata=ADMIN,
        timeout=5,
    )


# --- failures ------------------------------------------------------------------------------


def test_kill_9_of_a_replica_during_attempts_loses_nothing(pg_url: str, tmp_path: Path) -> None:
    slow = start_sink(delay=0.5)
    flags = ("--queue-lease", "3", "--queue-workers", "4")
    replicas = start_replicas(tmp_path, pg_url, 2, *flags)
    try:
        a, b = replicas
        a.put_settings(base_settings(slow))
        wait_until(lambda: etag(b) == etag(a), PROPAGATION, "settings propagated")
        wanted = [f"k{i:02d}" for i in range(24)]
        reply = a.mail.SendMailBatch(
            mail_pb2.SendMailBatchRequest(
                template_name="t",
                entries=[
                    mail_pb2.BatchEntry(to=[f"{n}@example.com"], parameters=struct({"n": n}))
                    for n in wanted
                ],
            ),
            metadata=SUPERADMIN,
            timeout=30,
        )
        assert len(reply.results) == len(wanted)
        slow.wait_data(2, timeout=20)
        a.stop(signal.SIGKILL)

        def all_arrived() -> bool:
            return set(subjects(slow)) >= set(wanted)

        wait_until(all_arrived, 40, "every queued mail delivered by the survivor")
        # A second hand-over is allowed only for the attempts the crash cut short, and it
        # carries the same Message-ID header.
        by_subject: dict[str, set[str]] = {}
        for r in list(slow.received):
            by_subject.setdefault(str(r.message["Subject"]), set()).add(r.message["Message-ID"])
        assert all(len(ids) == 1 for ids in by_subject.values())
        for id in (r.id for r in reply.results):
            message = b.mail.GetMessage(
                mail_pb2.GetMessageRequest(id=id), metadata=SUPERADMIN, timeout=5
            )
            assert message.status == S.MESSAGE_STATUS_SENT, message
    finally:
        stop_all(replicas)
        slow.stop()


def test_an_unreachable_database_at_start_exits_2_naming_it(tmp_path: Path) -> None:
    port = free_port()
    url = f"postgresql://mailsvc:Hunter2Secret@127.0.0.1:{port}/mail"
    server = start_server(tmp_path / "data", "--database-url", url, wait=False)
    assert server.proc.wait(timeout=30) == 2
    logs = server.logs()
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}/mail" in logs
    assert "Hunter2Secret" not in logs
    assert "Traceback" not in logs


@pytest.fixture
def own_pg() -> Iterator[pg.PgServer]:
    """A PostgreSQL of this test's own, which it stops and starts again."""
    server = pg.start_session_server()
    yield server
    pg.remove(server)


def test_a_database_restart_under_load_fails_calls_unavailable_then_recovers(
    own_pg: pg.PgServer, tmp_path: Path
) -> None:
    sink = start_sink()
    url = own_pg.create_database()
    replicas = start_replicas(tmp_path, url, 2)
    a, b = replicas
    try:
        a.put_settings(base_settings(sink))
        wait_until(lambda: etag(b) == etag(a), PROPAGATION, "settings propagated")
        accepted: list[str] = []
        codes: Counter[str] = Counter()
        stop = threading.Event()

        def load(server: Server, tag: str) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                name = f"{tag}{i:04d}"
                try:
                    send(
                        server,
                        to=[f"{name}@example.com"],
                        subject=name,
                        text="t",
                        queue=True,
                        timeout=5,
                    )
                except grpc.RpcError as exc:
                    codes[exc.code().name] += 1
                    time.sleep(0.05)
                else:
                    accepted.append(name)
                    codes["OK"] += 1
                time.sleep(0.02)

        threads = [threading.Thread(target=load, args=(r, t)) for r, t in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        wait_until(lambda: len(accepted) >= 10, 20, "load running")
        own_pg.stop()
        wait_until(lambda: not serving(a) and not serving(b), 10, "NOT_SERVING")
        wait_until(lambda: codes["UNAVAILABLE"] >= 2, 10, "calls refused")
        # Every kind of call that needs the database says UNAVAILABLE, not INTERNAL.
        write = settings_pb2.UpdateMailSettingsRequest(settings=base_settings(sink))
        suppressions = suppression_pb2_grpc.SuppressionServiceStub(a.channel)
        entry = mail_pb2.BatchEntry(to=["batch@example.com"], parameters=struct({"n": "b"}))
        calls: list[tuple[Callable[..., Any], Any]] = [
            (a.settings.UpdateMailSettings, write),
            (a.settings.DeleteMailSettings, settings_pb2.DeleteMailSettingsRequest()),
            (a.settings.UpdateSettingsAcl, settings_pb2.UpdateSettingsAclRequest()),
            (a.mail.GetMessage, mail_pb2.GetMessageRequest(id="x")),
            (a.mail.ListMessages, mail_pb2.ListMessagesRequest()),
            (a.mail.CancelMessage, mail_pb2.CancelMessageRequest(id="x")),
            (
                a.mail.SendMailBatch,
                mail_pb2.SendMailBatchRequest(template_name="t", entries=[entry]),
            ),
            (suppressions.ListSuppressions, suppression_pb2.ListSuppressionsRequest()),
            (
                suppressions.AddSuppression,
                suppression_pb2.AddSuppressionRequest(
                    suppression=suppression_pb2.Suppression(address="s@example.com")
                ),
            ),
        ]
        for call, request in calls:
            err = expect_error(
                grpc.StatusCode.UNAVAILABLE, call, request, metadata=SUPERADMIN, timeout=20
            )
            assert_error(err, grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE")
        # The settings stay readable from memory.
        assert etag(a) == etag(b)
        own_pg.start()
        wait_until(lambda: serving(a) and serving(b), 15, "SERVING again")
        count = len(accepted)
        wait_until(lambda: len(accepted) >= count + 10, 20, "accepting again")
        stop.set()
        for t in threads:
            t.join(10)
        assert set(codes) <= {"OK", "UNAVAILABLE"}, codes

        def all_arrived() -> bool:
            return set(subjects(sink)) >= set(accepted)

        wait_until(all_arrived, 40, "every accepted mail delivered")
        for replica in replicas:
            assert "Traceback" not in replica.logs()
    finally:
        stop_all(replicas)
        sink.stop()
