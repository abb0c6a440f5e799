"""Bad input and faults end to end: a store that cannot be used stops the start by name, a
full disk refuses the mail instead of losing it, malformed lifecycle requests are refused."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from mailsvc.v1 import mail_pb2, settings_pb2

from tests.conftest import (
    ADMIN,
    JWT_SECRET,
    SUPERADMIN,
    Server,
    SmtpSink,
    auth,
    details,
    free_port,
    make_token,
    smtp_settings,
)
from tests.helpers import (
    ServerFactory,
    SmtpFactory,
    assert_error,
    at,
    clean_env,
    expect_error,
    mail,
    send,
    struct,
    wait_until,
)

DB = "mailsvc.sqlite3"
ALICE = auth(make_token([], sub="alice"))
BOB = auth(make_token([], sub="bob"))
S = mail_pb2.MessageStatus
FAST_QUEUE = ("--queue-retry-initial", "0.2", "--queue-retry-max", "0.4")


def listed(server: Server, metadata: Any = ADMIN, **fields: Any) -> list[str]:
    reply = server.mail.ListMessages(
        mail_pb2.ListMessagesRequest(**fields), metadata=metadata, timeout=10
    )
    return [m.id for m in reply.messages]


# --- a store that cannot be used stops the start ------------------------------------------


def without_dac_override() -> list[str]:
    """A command prefix under which file permissions bind the server even when tests run as
    root: the capabilities that bypass them are dropped (setpriv, util-linux)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permissions cannot bind the server")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


def serve_refused(
    data_dir: Path, prefix: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`mailsvc serve` on `data_dir`, which must stop at start."""
    command = [*(prefix or []), sys.executable, "-m", "mailsvc", "serve"]
    command += ["--data-dir", str(data_dir), "--listen", f"127.0.0.1:{free_port()}"]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=clean_env(MAILSVC_JWT_SECRET=JWT_SECRET),
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    # short: one line saying what and where, not a dump
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result


def a_good_store(server_factory: ServerFactory, data_dir: Path) -> str:
    """Leave a working store with one scheduled mail in `data_dir`; its record id."""
    server = server_factory(data_dir=data_dir)
    id = send(server, mail(send_at=at(3600))).id
    assert server.stop() == 0
    return id


@pytest.mark.parametrize(
    "junk",
    [
        pytest.param(b"this is not a database\n" * 400, id="text"),
        # a valid header over garbage: what a torn or overwritten file looks like
        pytest.param(b"SQLite format 3\x00" + bytes(range(256)) * 32, id="sqlite-header"),
    ],
)
def test_a_corrupt_store_stops_the_start_by_name_and_is_left_alone(
    tmp_path: Path, junk: bytes
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = data_dir / DB
    db.write_bytes(junk)
    result = serve_refused(data_dir)
    assert str(db) in result.stderr
    assert db.read_bytes() == junk  # never reset, never "repaired"


def test_a_store_damaged_deep_inside_stops_the_start(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """A sound header and schema over damaged pages: refused at start, not mail by mail."""
    data_dir = tmp_path / "data"
    server = server_factory(data_dir=data_dir)
    server.put_settings(
        settings_pb2.MailSettings(
            templates={"t": settings_pb2.MailTemplate(subject="s", text="x" * 2000)}
        )
    )
    server.mail.SendMailBatch(
        mail_pb2.SendMailBatchRequest(
            template_name="t",
            send_at=at(3600),
            entries=[mail_pb2.BatchEntry(to=[f"r{i}@example.com"]) for i in range(1000)],
        ),
        metadata=SUPERADMIN,
        timeout=60,
    )
    assert server.stop() == 0
    db = data_dir / DB
    data = bytearray(db.read_bytes())
    pages = len(data) // 4096
    assert pages > 100, pages
    for page in range(pages * 2 // 5, pages * 3 // 5):  # the middle fifth: records, payloads
        data[page * 4096 : (page + 1) * 4096] = bytes([page % 251]) * 4096
    db.write_bytes(data)
    result = serve_refused(data_dir)
    assert f"{db}: the database is damaged" in result.stderr
    assert db.read_bytes() == data


def test_a_directory_in_place_of_the_store_stops_the_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    (data_dir / DB).mkdir(parents=True)
    result = serve_refused(data_dir)
    assert str(data_dir / DB) in result.stderr and "directory" in result.stderr


def test_an_unwritable_store_file_stops_the_start_and_keeps_its_mail(
    server_factory: ServerFactory, tmp_path: Path, smtp_sink: SmtpSink
) -> None:
    data_dir = tmp_path / "data"
    id = a_good_store(server_factory, data_dir)
    db = data_dir / DB
    before = db.read_bytes()
    db.chmod(0o400)
    result = serve_refused(data_dir, without_dac_override())
    assert str(db) in result.stderr
    assert db.read_bytes() == before
    assert stat.S_IMODE(db.stat().st_mode) == 0o400  # not "fixed" behind the operator's back
    db.chmod(0o600)
    again = server_factory(data_dir=data_dir)
    assert again.mail.GetMessage(
        mail_pb2.GetMessageRequest(id=id), metadata=ADMIN, timeout=10
    ).status == (S.MESSAGE_STATUS_SCHEDULED)


def test_a_read_only_data_dir_stops_the_start(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    a_good_store(server_factory, data_dir)
    before = (data_dir / DB).read_bytes()
    data_dir.chmod(0o500)
    try:
        result = serve_refused(data_dir, without_dac_override())
    finally:
        data_dir.chmod(0o700)
    assert f"{data_dir / DB}: cannot write" in result.stderr
    assert "not a usable" not in result.stderr  # the file is fine: do not send them repairing it
    assert (data_dir / DB).read_bytes() == before


def test_a_second_server_on_the_same_data_dir_stops_naming_the_lock(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    first = server_factory()
    id = send(first, mail(send_at=at(3600))).id
    result = serve_refused(first.data_dir)
    assert f"{first.data_dir / DB}.lock" in result.stderr
    assert "in use" in result.stderr
    # the first one is untouched and keeps serving its records
    reply = first.mail.GetMessage(mail_pb2.GetMessageRequest(id=id), metadata=ADMIN, timeout=10)
    assert reply.status == S.MESSAGE_STATUS_SCHEDULED


# --- a full disk on accept ----------------------------------------------------------------


def limit_file_size(server: Server, limit: int) -> None:
    """Let the running server write no file past `limit` bytes: a full disk, as the kernel
    tells it (EFBIG; CPython ignores SIGXFSZ)."""
    _, hard = resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE)
    # the soft limit only: lifting it again needs no privilege
    resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (limit, hard))


def test_a_full_disk_refuses_the_mail_and_loses_none_it_accepted(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    down, up = smtp_factory(), smtp_factory()
    down.handler.always = "451 try later"  # nothing leaves while the disk fills
    server = server_factory(*FAST_QUEUE, "--send-attempts", "1")
    server.put_settings(settings_pb2.MailSettings(smtp=smtp_settings(down)))
    files = [server.data_dir / n for n in (DB, f"{DB}-wal", "settings.json")]
    used = max(f.stat().st_size for f in files if f.exists())
    limit_file_size(server, used + 2 * 1024 * 1024)
    body = "".join(f"line {i} of a long enough mail body\n" for i in range(4000))  # ~150 KB
    accepted: dict[str, str] = {}
    refused: list[str] = []
    for i in range(200):
        to = f"r{i}@example.com"
        try:
            reply = send(server, mail(to=[to], text=body, queue=True))
        except grpc.RpcError as err:
            assert_error(err, grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE")
            refused.append(to)
            if len(refused) == 3:
                break
            continue
        assert reply.status == S.MESSAGE_STATUS_QUEUED
        accepted[to] = reply.id
    assert len(refused) == 3, "the file size limit never refused a mail"
    assert len(accepted) >= 5
    assert server.proc.poll() is None  # a full disk is not a crash

    # A crash on top: what was answered QUEUED was committed before the answer.
    server.stop(signal.SIGKILL)
    again = server_factory(*FAST_QUEUE, data_dir=server.data_dir)
    again.put_settings(settings_pb2.MailSettings(smtp=smtp_settings(up)))
    received = up.wait_for(len(accepted), timeout=60)
    up.expect_no_more(within=1.0)
    assert sorted(r.rcpt_tos[0] for r in received) == sorted(accepted)

    def sent(id: str) -> bool:
        record = again.mail.GetMessage(
            mail_pb2.GetMessageRequest(id=id), metadata=ADMIN, timeout=10
        )
        return bool(record.status == S.MESSAGE_STATUS_SENT)

    for to, id in accepted.items():
        wait_until(lambda id=id: sent(id), 15, f"{to} SENT")  # type: ignore[misc]
    assert len(listed(again, page_size=1000)) == len(accepted)  # the refused left no record


# --- malformed lifecycle requests ------------------------------------------------------------


@pytest.fixture(scope="module")
def lifecycle_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Any:
    """One server for the malformed-request checks; alice has one scheduled mail in it."""
    from tests.conftest import start_server

    server = start_server(tmp_path_factory.mktemp("malformed") / "data")
    server.put_settings(
        settings_pb2.MailSettings(
            enable_user_full_access=True,
            templates={"t": settings_pb2.MailTemplate(subject="s", text="x", roles=["user"])},
        )
    )
    yield server
    server.stop(signal.SIGKILL)


def get_fails(server: Server, call: str, id: str, code: grpc.StatusCode) -> grpc.RpcError:
    request: Any = (
        mail_pb2.GetMessageRequest(id=id)
        if call == "GetMessage"
        else mail_pb2.CancelMessageRequest(id=id)
    )
    err = expect_error(code, getattr(server.mail, call), request, metadata=ADMIN, timeout=10)
    return err


@pytest.mark.parametrize("call", ["GetMessage", "CancelMessage"])
def test_an_empty_id_is_invalid_argument_naming_id(lifecycle_server: Server, call: str) -> None:
    err = get_fails(lifecycle_server, call, "", grpc.StatusCode.INVALID_ARGUMENT)
    assert list(details(err)["violations"]) == ["id"]


@pytest.mark.parametrize("call", ["GetMessage", "CancelMessage"])
@pytest.mark.parametrize(
    "id",
    [
        pytest.param("x" * 200_000, id="huge"),
        pytest.param("' OR 1=1 --", id="sql"),
        pytest.param("%\x00_*", id="nul-and-wildcards"),
        pytest.param("\u202eüñï©ødé" * 50, id="unicode"),
    ],
)
def test_an_absurd_id_is_not_found_without_echoing_it_whole(
    lifecycle_server: Server, call: str, id: str
) -> None:
    err = get_fails(lifecycle_server, call, id, grpc.StatusCode.NOT_FOUND)
    assert_error(err, grpc.StatusCode.NOT_FOUND, "MESSAGE_NOT_FOUND")
    assert len(err.details()) < 1000
    assert lifecycle_server.proc.poll() is None


def test_list_messages_refuses_a_negative_page_size_and_an_unknown_status(
    lifecycle_server: Server,
) -> None:
    server = lifecycle_server
    for request, field in (
        (mail_pb2.ListMessagesRequest(page_size=-1), "page_size"),
        (mail_pb2.ListMessagesRequest(page_size=-(2**31)), "page_size"),
        (mail_pb2.ListMessagesRequest(status=99), "status"),  # type: ignore[arg-type]
        (mail_pb2.ListMessagesRequest(status=-3), "status"),  # type: ignore[arg-type]
    ):
        err = expect_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            server.mail.ListMessages,
            request,
            metadata=ADMIN,
            timeout=10,
        )
        assert list(details(err)["violations"]) == [field], request
    # a huge page size is clamped, not refused
    assert (
        server.mail.ListMessages(
            mail_pb2.ListMessagesRequest(page_size=2**31 - 1), metadata=ADMIN, timeout=10
        ).next_page_token
        == ""
    )


def test_a_page_token_of_another_caller_is_refused(lifecycle_server: Server) -> None:
    server = lifecycle_server
    for _ in range(3):
        send(server, mail(send_at=at(3600)), metadata=ALICE)
    page = server.mail.ListMessages(
        mail_pb2.ListMessagesRequest(page_size=1), metadata=ALICE, timeout=10
    )
    assert page.next_page_token
    for other in (BOB, ADMIN):  # bob's listing and an admin's are other filters
        err = expect_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            server.mail.ListMessages,
            mail_pb2.ListMessagesRequest(page_size=1, page_token=page.next_page_token),
            metadata=other,
            timeout=10,
        )
        assert list(details(err)["violations"]) == ["page_token"]
    # and alice's own next page works
    mine = server.mail.ListMessages(
        mail_pb2.ListMessagesRequest(page_size=1, page_token=page.next_page_token),
        metadata=ALICE,
        timeout=10,
    )
    assert len(mine.messages) == 1 and mine.messages[0].caller == "alice"


def test_send_at_more_than_7_days_ahead_stores_nothing_in_any_send_call(
    lifecycle_server: Server,
) -> None:
    server = lifecycle_server
    before = listed(server, page_size=1000)
    too_late = at(7 * 86400 + 120)
    calls: list[tuple[Any, Any]] = [
        (server.mail.SendMail, mail(send_at=too_late)),
        (server.mail.SendMail, mail(send_at=too_late, queue=True, idempotency_key="late-1")),
        (
            server.mail.SendTemplatedMail,
            mail_pb2.SendTemplatedMailRequest(
                template_name="t", to=["a@example.com"], send_at=too_late
            ),
        ),
        (
            server.mail.SendMailBatch,
            mail_pb2.SendMailBatchRequest(
                template_name="t",
                entries=[mail_pb2.BatchEntry(to=["a@example.com"], parameters=struct({}))],
                send_at=too_late,
            ),
        ),
    ]
    for call, request in calls:
        err = expect_error(
            grpc.StatusCode.INVALID_ARGUMENT, call, request, metadata=ADMIN, timeout=10
        )
        assert list(details(err)["violations"]) == ["send_at"], request
    assert listed(server, page_size=1000) == before
    # the refused key was not kept: the same key with a good request is a first request
    reply = send(server, mail(send_at=at(3600), idempotency_key="late-1"))
    assert reply.status == S.MESSAGE_STATUS_SCHEDULED


@pytest.mark.parametrize(
    "stamp",
    [
        pytest.param(Timestamp(seconds=int(time.time()) + 60, nanos=-1), id="negative-nanos"),
        pytest.param(Timestamp(seconds=int(time.time()) + 60, nanos=10**9), id="nanos-overflow"),
        pytest.param(Timestamp(seconds=-(10**12)), id="before-year-1"),
    ],
)
def test_a_send_at_that_is_no_timestamp_is_invalid_and_stores_nothing(
    lifecycle_server: Server, stamp: Timestamp
) -> None:
    server = lifecycle_server
    before = listed(server, page_size=1000)
    err = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, send, server, mail(send_at=stamp, queue=True)
    )
    assert list(details(err)["violations"]) == ["send_at"]
    assert listed(server, page_size=1000) == before


def test_after_a_full_disk_the_running_server_recovers_when_space_returns(
    server_factory: ServerFactory, smtp_factory: SmtpFactory
) -> None:
    down, up = smtp_factory(), smtp_factory()
    down.handler.always = "451 try later"
    server = server_factory(*FAST_QUEUE, "--send-attempts", "1", "--queue-lease", "15")
    server.put_settings(settings_pb2.MailSettings(smtp=smtp_settings(down)))
    used = max(f.stat().st_size for f in server.data_dir.iterdir() if f.is_file())
    limit_file_size(server, used + 1024 * 1024)
    body = "".join(f"line {i} of a long enough mail body\n" for i in range(4000))
    accepted: dict[str, str] = {}
    for i in range(200):
        to = f"r{i}@example.com"
        try:
            accepted[to] = send(server, mail(to=[to], text=body, queue=True)).id
        except grpc.RpcError as err:
            assert_error(err, grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE")
            break
    else:
        raise AssertionError("the file size limit never refused a mail")

    # Space is back (no restart): new mail is taken and everything accepted goes out.
    limit_file_size(server, resource.RLIM_INFINITY)
    accepted["late@example.com"] = send(server, mail(to=["late@example.com"], queue=True)).id
    server.put_settings(settings_pb2.MailSettings(smtp=smtp_settings(up)))
    received = up.wait_for(len(accepted), timeout=60)
    assert sorted(r.rcpt_tos[0] for r in received) == sorted(accepted)

    def sent(id: str) -> bool:
        record = server.mail.GetMessage(
            mail_pb2.GetMessageRequest(id=id), metadata=ADMIN, timeout=10
        )
        return bool(record.status == S.MESSAGE_STATUS_SENT)

    for to, id in accepted.items():
        wait_until(lambda id=id: sent(id), 15, f"{to} SENT")  # type: ignore[misc]
    up.expect_no_more(within=1.0)
